"""Preference rows: a `chosen` and a `rejected` answer to one prompt, in TRL's two conventions.

- explicit prompt: a `prompt` column, and `chosen`/`rejected` holding the answers only, all three
  text, or all three message lists (`prompt` the turns before the answer, `chosen` and `rejected`
  the assistant's turn);
- implicit prompt: no usable `prompt`, the prompt is what `chosen` and `rejected` share. Message
  lists: every turn before the last, which must be the same in both; text: their longest common
  prefix (TRL's `extract_prompt`, a space before the answer left with the prompt's side).

Which one a row uses follows TRL's `maybe_extract_prompt`: explicit when a `prompt` is there and of the
same kind (text or message list) as `chosen`, implicit otherwise. So the paper's data
(argilla/distilabel-capybara-dpo-7k-binarized: `prompt` text, `chosen`/`rejected` whole
conversations) reads as implicit, exactly as TRL reads it.

A row whose rejected answer cannot be trained on is skipped with its reason (data/rows.py counts them):
rejected missing, empty or not text, identical to chosen, or (implicit form) chosen and rejected
answering different prompts. Runs that use only the chosen answers (`sapo.pairs` self, spin) read
the same rows without looking at `rejected` where the prompt does not depend on it.
"""

from __future__ import annotations

from typing import Any

from ..errors import DataError
from .rows import RowProblem, as_message, as_text

PAIRS = "chosen/rejected"  # the `column` of preference data (TokenizedData.column)


def reads_pairs(columns: list[str], column: str | None, with_rejected: bool) -> bool:
    """Whether rows are read as preference pairs; an error when the run needs pairs and the data has none.

    `data.column` unset or `chosen`, and both columns present: pairs. A run that trains on the data's
    rejected answers (`with_rejected`) and finds no `rejected` column is refused here, before any row.
    """
    has_pairs = "chosen" in columns and "rejected" in columns and column in (None, "chosen")
    if with_rejected and not has_pairs:
        found = ", ".join(columns) or "none"
        raise DataError(
            f"this run trains on the data's rejected answers, but the data has no `chosen` and `rejected` "
            f"columns{'' if column in (None, 'chosen') else f' (data.column={column})'}; columns: {found}",
            "use preference data (`chosen` + `rejected`, with or without `prompt`), or set `sapo.pairs=self` "
            "(the EMA writes the rejected answers)",
        )
    return has_pairs


def is_conversation(value: Any) -> bool:
    """A message list, as TRL's `is_conversational` tells it: a list whose first item is a dict with a role."""
    return (isinstance(value, list) and bool(value) and isinstance(value[0], dict)
            and ("role" in value[0] or "from" in value[0]))


def to_preference(row: dict[str, Any], with_rejected: bool) -> tuple[list[dict[str, str]], str, str | None]:
    """(prompt messages, chosen answer, rejected answer or None when not read); RowProblem for a bad row."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if chosen is None:
        raise RowProblem("chosen is null")
    if prompt is not None and is_conversation(prompt) == is_conversation(chosen):
        messages = ([as_message(m, n) for n, m in enumerate(prompt, start=1)] if is_conversation(prompt)
                    else [{"role": "user", "content": as_text(prompt, "prompt")}])
        answer = _answer(chosen, "chosen")
        other = _answer(rejected, "rejected") if with_rejected else None
    elif is_conversation(chosen):
        messages, answer = _turns(chosen, "chosen")
        other = None
        if with_rejected:
            other_messages, other = _turns(rejected, "rejected")
            if other_messages != messages:
                raise RowProblem("chosen and rejected have different prompts (the turns before the answer)")
    else:
        messages, answer, other = _common_prefix(as_text(chosen, "chosen"), rejected)
        other = other if with_rejected else None
    if other is not None and other.strip() == answer.strip():
        raise RowProblem("rejected is identical to chosen")
    return messages, answer, other


def _answer(value: Any, what: str) -> str:
    """An answer in the explicit form: text, or a message list ending with the assistant's turn."""
    if value is None:
        raise RowProblem(f"{what} is null")
    if is_conversation(value):
        return _turns(value, what)[1]
    if isinstance(value, list) and not value:
        raise RowProblem(f"{what} is empty")
    return as_text(value, what)


def _turns(value: Any, what: str) -> tuple[list[dict[str, str]], str]:
    """(turns before the answer, the answer) of a conversation whose last turn is the assistant's."""
    if value is None:
        raise RowProblem(f"{what} is null")
    if not isinstance(value, list):
        raise RowProblem(f"{what} holds {'text' if isinstance(value, str) else 'no message list'}, "
                         "not a message list like chosen")
    if not value:
        raise RowProblem(f"{what} is empty")
    turns = [as_message(m, n) for n, m in enumerate(value, start=1)]
    if turns[-1]["role"] != "assistant":
        raise RowProblem(f"{what}'s last turn is `{turns[-1]['role']}`, not the assistant's")
    return turns[:-1], turns[-1]["content"]


def _common_prefix(chosen: str, rejected: Any) -> tuple[list[dict[str, str]], str, str]:
    """Implicit text: the prompt is the longest common prefix, TRL's rule (a space before the answers stays
    with them)."""
    if rejected is None:
        raise RowProblem("rejected is null (text without a `prompt` column: the prompt is what both share)")
    rejected = as_text(rejected, "rejected")
    end = 0
    limit = min(len(chosen), len(rejected))
    while end < limit and chosen[end] == rejected[end]:
        end += 1
    if end == limit:
        if len(chosen) == len(rejected):
            raise RowProblem("rejected is identical to chosen")
        raise RowProblem("one of chosen and rejected is a prefix of the other: no answer to tell apart")
    if end and chosen[end - 1] == " ":
        end -= 1
    if not chosen[:end].strip():
        raise RowProblem("chosen and rejected share no prompt (text without a `prompt` column)")
    return [{"role": "user", "content": chosen[:end].strip()}], as_text(chosen[end:], "chosen"), \
        as_text(rejected[end:], "rejected")
