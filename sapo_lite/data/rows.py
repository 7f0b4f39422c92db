"""From a row to (prompt messages, response text), and an account of the rows that cannot be used.

Shapes, auto-detected or chosen with `data.column`:
- a message-list column (`chosen` as in the paper's data, `messages`, `conversations`): the last
  turn must be the assistant's and is the response; everything before it is the prompt. Messages
  are `role`/`content` (OpenAI; `content` may be a list of text parts, which are joined) or
  ShareGPT's `from`/`value` with `human`/`gpt`;
- `prompt` and `response` text columns.

A row that cannot be used is never turned into text: a null, empty or non-text response or message
(`null` would otherwise train the literal answer "None", a number its digits), a non-text content
part, a row in another shape than the rest, or a conversation that does not end with the
assistant. Such rows are skipped and counted with their reasons; past `data.max_bad_share` of
the rows the data is refused.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..errors import DataError

MESSAGE_COLUMNS = ("chosen", "messages", "conversations")
TEXT_PAIR = "prompt/response"
SHAPES_HELP = "a message-list column (`chosen` or `messages`), or `prompt` and `response` text columns"
SHOWN_PROBLEMS = 3


class RowProblem(Exception):
    """Why one row cannot be used; the row is skipped and counted."""


def detect_column(columns: list[str], column: str | None, rows: Any = None) -> str:
    """The message-list column to use, or `prompt/response` for the text-pair shape.

    When rows mix shapes, the shape most of the first 1000 rows use wins; the others are skipped.
    """
    if column:
        if column not in columns:
            raise DataError(f"column `{column}` not found; columns: {', '.join(columns)}", "set `data.column`")
        return column
    candidates = [c for c in MESSAGE_COLUMNS if c in columns]
    if "prompt" in columns and "response" in columns:
        candidates.append(TEXT_PAIR)
    if len(candidates) > 1 and isinstance(rows, list):
        def used_by(candidate: str) -> int:
            key = "prompt" if candidate == TEXT_PAIR else candidate
            return sum(row.get(key) is not None for row in rows[:1000])
        return max(candidates, key=used_by)  # ties keep the first: message lists before prompt/response
    if candidates:
        return candidates[0]
    raise DataError(
        f"no usable column; found: {', '.join(columns) or 'none'}",
        f"expected {SHAPES_HELP}, or name one with `data.column`",
    )


def shape_name(column: str) -> str:
    return "prompt and response text" if column == TEXT_PAIR else "message lists"


def to_conversation(row: dict[str, Any], column: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, response text) from one row; RowProblem when the row cannot be used."""
    if column == TEXT_PAIR:
        if row.get("prompt") is None and row.get("response") is None:
            raise RowProblem(f"no prompt/response ({_other_shape(row, column)})")
        prompt = as_text(row.get("prompt"), "prompt")
        return [{"role": "user", "content": prompt}], as_text(row.get("response"), "response")
    messages = row.get(column)
    if messages is None:
        raise RowProblem(f"`{column}` is null ({_other_shape(row, column)})")
    if isinstance(messages, str):
        raise RowProblem(f"`{column}` holds text, not a message list")
    if not isinstance(messages, list) or not messages:
        raise RowProblem(f"`{column}` is {'an empty list' if messages == [] else 'not a message list'}")
    turns = [as_message(m, number) for number, m in enumerate(messages, start=1)]
    if turns[-1]["role"] != "assistant":
        roles = ", ".join(t["role"] for t in turns)
        raise RowProblem(f"last turn is `{turns[-1]['role']}`, not the assistant's (roles: {roles})")
    return turns[:-1], turns[-1]["content"]


def _other_shape(row: dict[str, Any], column: str) -> str:
    filled = [k for k, v in row.items() if v is not None and k != column]
    if column != TEXT_PAIR and row.get("prompt") is not None:
        return "row in prompt/response shape, the rest are message lists"
    other = next((c for c in MESSAGE_COLUMNS if row.get(c) is not None), None)
    if column == TEXT_PAIR and other:
        return f"row has a `{other}` message list, the rest are prompt/response"
    return f"filled columns: {', '.join(filled) or 'none'}"


def as_text(value: Any, what: str) -> str:
    """The value as training text, or RowProblem: null, empty and non-text values are never stringified."""
    if value is None:
        raise RowProblem(f"{what} is null")
    if isinstance(value, list):  # OpenAI content parts
        value = _join_parts(value, what)
    if not isinstance(value, str):
        kind = {bool: "true/false", int: "a number", float: "a number", dict: "an object"}.get(type(value), "not text")
        raise RowProblem(f"{what} is {kind}, not text")
    if not value.strip():
        raise RowProblem(f"{what} is empty")
    # Leading whitespace goes, as in the official SAPO preprocessing: after the template's header a
    # stray space or newline would be the first thing the policy learns to say.
    return value.lstrip()


def _join_parts(parts: list[Any], what: str) -> str:
    texts = []
    for number, part in enumerate(parts, start=1):
        kind = part.get("type", "text") if isinstance(part, dict) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise RowProblem(f"{what} part {number} is `{kind}`, not text (only text parts can be trained on)")
        texts.append(part["text"])
    return "\n".join(texts)


def as_message(message: Any, number: int) -> dict[str, str]:
    if not isinstance(message, dict):
        raise RowProblem(f"message {number} is not an object with role and content")
    # ShareGPT-style rows use from/value and human/gpt.
    role = message.get("role", message.get("from"))
    if not isinstance(role, str) or not role:
        raise RowProblem(f"message {number} has no role")
    role = {"human": "user", "gpt": "assistant"}.get(role, role)
    content = message.get("content", message.get("value"))
    return {"role": role, "content": as_text(content, f"message {number} ({role}) content")}


@dataclass
class RowReport:
    """Rows read, rows skipped by reason, and the first few skipped rows with their places."""

    rows: int = 0
    reasons: Counter = field(default_factory=Counter)
    first: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def skip(self, place: str, reason: str) -> None:
        # Group by reason without the row-specific numbers ("message 3 ..." and "message 5 ..." alike).
        self.reasons[_reason_kind(reason)] += 1
        if len(self.first) < SHOWN_PROBLEMS:
            self.first.append(f"{place}: {reason}")

    def summary(self) -> str:
        """`2 rows skipped (response is null: 1, ...; line 3: response is null, ...)`; empty when none."""
        if not self.skipped:
            return "0 rows skipped"
        rows = "row" if self.skipped == 1 else "rows"
        return f"{self.skipped} {rows} skipped ({self.details()})"

    def details(self) -> str:
        counts = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common())
        return f"{counts}; first: {'; '.join(self.first)}"

    def check(self, max_share: float, source: str) -> None:
        """Refuse the data when more than `max_share` of its rows cannot be used."""
        if self.rows and self.skipped / self.rows > max_share:
            raise DataError(
                f"{self.skipped} of {self.rows} rows of `{source}` ({self.skipped / self.rows:.0%}) cannot be used, "
                f"more than data.max_bad_share={max_share:g}: {self.details()}",
                f"fix or remove those rows, or raise `data.max_bad_share` (now {max_share:g}) to skip them",
            )


def _reason_kind(reason: str) -> str:
    words = re.sub(r" \([^()]*\)$", "", reason).split()
    return " ".join("N" if word.isdigit() else word for word in words)
