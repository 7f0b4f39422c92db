"""Tokenize SFT-style data (prompt + good response) through a chat template.

Reading files is `data_files.py`; shapes and unusable rows are `data_rows.py`. Rows become
`Example`s in one place, `row_to_example`; columns it does not use pass through untouched.

Optional `constraints` (a list of checkable instructions, see constraints.py) and `answer`
columns travel with each example, for evaluation.

The response keeps its end-of-turn token (EOS): SAPO's EMA may end a rewritten segment
early by emitting it, and the trained policy must learn where answers stop.

Tokenisation against the official SAPO code:
- same: every message loses its leading whitespace, as the official preprocessing does.
- departs: the template's assistant header ends the prompt (official: it opens the response, so
  it is scored and may be rewritten); the response ends at the template's own end-of-turn token
  (official: one more EOS after it); the prompt starts with BOS when the tokenizer adds one, so the
  EMA generates from the same ids the policy is trained on (official: no BOS before the
  generator's input). Each keeps the scored tokens to the ones the model writes when it answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config.schema import HOLDOUT, DataConfig
from ..errors import DataError
from .constraints import check
from .files import Rows, load_rows
from .pairs import PAIRS, reads_pairs, to_preference
from .rows import RowProblem, RowReport, detect_column, shape_name, to_conversation
from .streams import set_aside

# Templates that add no new tokens to the vocabulary: their markers are plain text, so a
# base model needs no newly trained embeddings to use them.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "zephyr": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}
# The families' end-of-turn markers (models/families/: ChatML, Llama 3, Phi, Mistral, Gemma 3); a test holds
# every family's marker here.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>", "<end_of_turn>")
# Passed to every template render; a template that does not read an option ignores it. `enable_thinking`
# (Qwen3): False, so the prompt ends with Qwen3's own empty `<think>\n\n</think>\n\n` block and the response
# is the answer alone: no think tag is scored, rewritten by the EMA, or re-rendered into a turn. SAPO rewrites
# segments of answers; reasoning traces are another recipe (rows that carry them are skipped, see below).
TEMPLATE_OPTIONS = {"enable_thinking": False}
THINK_TAGS = ("<think>", "</think>")


@dataclass
class Example:
    """One tokenized example: prompt ids (with BOS where the template wants it) and response ids."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_text: str
    constraints: list[dict] | None = None  # checkable instructions (data/constraints.py), when the data has them
    answer: str | None = None  # the reference answer, when the data has one
    row_index: int | None = None  # its row in the data it was read from (TokenizedData.rows), e.g. to write it out
    rejected_ids: np.ndarray | None = None
    """The data's rejected response (data/pairs.py), cut like the chosen one; None unless the run reads it."""


@dataclass
class TokenizedData:
    examples: list[Example]
    dropped_long_prompt: int
    truncated_response: int
    source: str
    column: str = ""
    report: RowReport = field(default_factory=RowReport)
    unknown_share: float = 0.0
    """Share of response tokens the tokenizer maps to its unknown token."""
    notes: list[str] = field(default_factory=list)
    rows: Rows | None = None
    """The rows the examples came from, as read (`Example.row_index` points into them)."""
    with_rejected: bool = False
    """Each example carries the data's rejected response (`Example.rejected_ids`)."""

    def shape(self) -> str:
        if self.column != PAIRS:
            return shape_name(self.column)
        return "preference pairs" + ("" if self.with_rejected else ", the chosen answers only")

    def describe(self, cfg: DataConfig) -> str:
        """The `data:` line: what was read, which shape, and what happened to every row."""
        notes = "".join(f", {note}" for note in self.notes)
        return (
            f"data: {len(self.examples)} {'pairs' if self.with_rejected else 'examples'} from {self.source}{notes}, "
            f"column {self.column} ({self.shape()}); {self.report.summary()}; {self.dropped_long_prompt} dropped: "
            f"prompt > {cfg.max_prompt_len} tokens; {self.truncated_response} responses cut to {cfg.max_len} tokens"
        )


def row_metadata(row: dict[str, Any]) -> tuple[list[dict] | None, str | None]:
    """(constraints, answer) of a row, None where the column is missing or empty.

    `datasets` may store a column of differently shaped dicts as one struct: keys a constraint
    does not have then come back as None and are dropped here. An unknown kind or wrong
    parameters fail here, at load time, rather than after generating answers.
    """
    constraints = row.get("constraints")
    if constraints:
        if isinstance(constraints, str) or not all(isinstance(c, dict) for c in constraints):
            raise DataError("`constraints` must be a list of objects such as {\"kind\": \"no_commas\"}",
                            "see sapo_lite/data/constraints.py for the kinds and their parameters")
        constraints = [{k: v for k, v in c.items() if v is not None} for c in constraints]
        for constraint in constraints:
            check("", constraint)
    answer = row.get("answer")
    return constraints or None, None if answer is None else str(answer)


# ---------------------------------------------------------------- chat template


def install_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    """Set the tokenizer's template from `data.chat_template`; fail when none is usable."""
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            tokenizer.chat_template = BUILTIN_TEMPLATES[chat_template]
        elif Path(chat_template).is_dir():
            raise DataError(f"data.chat_template `{chat_template}` is a folder", "point it at a .jinja file")
        elif Path(chat_template).is_file():
            tokenizer.chat_template = Path(chat_template).read_text()
        else:
            raise DataError(
                f"chat template `{chat_template}` is neither built in nor a file",
                f"use one of {', '.join(BUILTIN_TEMPLATES)} or a path to a .jinja file",
            )
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template",
            f"set `data.chat_template` to {' or '.join(BUILTIN_TEMPLATES)}, or a .jinja file",
        )
    check_template_syntax(tokenizer.chat_template, f"`{chat_template}`" if chat_template else "of the tokenizer")


def check_template_syntax(template: Any, source: str) -> None:
    """A Jinja syntax error as one line with its line number, before any row is rendered."""
    import jinja2

    try:  # transformers' own environment, with the tags its templates may use (`{% generation %}`)
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # a transformers without it: plain Jinja with the loop controls templates use
        def compile_template(text: str) -> Any:
            return jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)

    texts = template.values() if isinstance(template, dict) else [template]  # named templates
    for text in texts:
        try:
            compile_template(text)
        except jinja2.TemplateSyntaxError as exc:
            raise DataError(
                f"chat template {source} has a Jinja syntax error at line {exc.lineno}: {exc.message}",
                "fix the template, or set `data.chat_template` to chatml or zephyr",
            ) from None


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS plus the template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return sorted(ids)


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids with the generation prompt, and BOS exactly once when the model expects one."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **TEMPLATE_OPTIONS)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and _adds_bos(tokenizer) and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


def _adds_bos(tokenizer: Any) -> bool:
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def tokenize_conversation(
    tokenizer: Any, prompt_messages: list[dict[str, str]], response: str, stops: list[int]
) -> tuple[list[int], list[int]]:
    if any(tag in response for tag in THINK_TAGS) and "</think>" in str(tokenizer.chat_template):
        raise RowProblem("the answer holds a <think> block (reasoning traces are not trained: drop the block)")
    prompt_ids = render_prompt_ids(tokenizer, prompt_messages)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True,
                                                **TEMPLATE_OPTIONS)
    full_text = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": response}], tokenize=False, **TEMPLATE_OPTIONS
    )
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text) :]
    else:  # a template that rewrites earlier turns: fall back to the raw answer
        response_text = response
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    # Keep the answer up to and including its first stop token: drops a trailing "\n", and the EOS that
    # Phi's template writes after the conversation's last `<|end|>` (the model stops at `<|end|>`).
    first_stop = min((i for i, tok in enumerate(response_ids) if tok in stops), default=None)
    if first_stop is None:
        response_ids = [*response_ids, stops[0]] if stops else response_ids
    else:
        response_ids = response_ids[: first_stop + 1]
    return prompt_ids, response_ids


def row_to_example(
    row: dict[str, Any], column: str, tokenizer: Any, stops: list[int], cfg: DataConfig, with_rejected: bool = False
) -> tuple[Example | None, bool]:
    """One row as an Example (None: prompt too long) and whether its response was cut.

    Raises RowProblem when the row cannot be used. Columns other than the shape's are not read.
    """
    rejected = None
    if column == PAIRS:
        prompt_messages, response, rejected = to_preference(row, with_rejected)
    else:
        prompt_messages, response = to_conversation(row, column)
    prompt_ids, response_ids = tokenize_conversation(tokenizer, prompt_messages, response, stops)
    if len(prompt_ids) > cfg.max_prompt_len:
        return None, False
    room = cfg.max_len - len(prompt_ids)
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    example = Example(
        np.asarray(prompt_ids, np.int32), np.asarray(response_ids, np.int32), response.strip(), *row_metadata(row)
    )
    if rejected is not None:
        rejected_ids = tokenize_conversation(tokenizer, prompt_messages, rejected, stops)[1]
        truncated |= len(rejected_ids) > room
        example.rejected_ids = np.asarray(rejected_ids[:room], np.int32)
    return example, truncated


def tokenize_dataset(rows: Rows, tokenizer: Any, cfg: DataConfig, with_rejected: bool = False) -> TokenizedData:
    """Tokenize every row; skip unusable rows, drop long prompts, cut long responses, and count all three.

    `with_rejected`: the run trains on the data's rejected answers, so the data must be preference pairs and
    each row's rejected answer is checked and tokenized too."""
    columns = list(rows.columns)
    pairs = reads_pairs(columns, cfg.column, with_rejected)
    column = PAIRS if pairs else detect_column(columns, cfg.column, rows.rows)
    stops = stop_token_ids(tokenizer)
    examples: list[Example] = []
    report = RowReport()
    dropped = truncated = unknown = response_tokens = 0
    unk = getattr(tokenizer, "unk_token_id", None)
    for index, row in enumerate(rows.rows):
        report.rows += 1
        try:
            example, cut = row_to_example(row, column, tokenizer, stops, cfg, with_rejected)
        except RowProblem as problem:
            report.skip(rows.place(index), str(problem))
            continue
        if example is None:
            dropped += 1
            continue
        truncated += cut
        example.row_index = index
        examples.append(example)
        if unk is not None:
            content = [t for t in example.response_ids.tolist() if t not in stops]
            unknown += sum(t == unk for t in content)
            response_tokens += len(content)
        if cfg.max_examples is not None and len(examples) >= cfg.max_examples:
            break
    report.check(cfg.max_bad_share, rows.source)
    if not examples:
        raise DataError(
            f"every one of the {dropped} prompts in `{rows.source}` is longer than "
            f"data.max_prompt_len={cfg.max_prompt_len} tokens",
            "raise `data.max_prompt_len` (and `data.max_len`) or use shorter prompts",
        )
    return TokenizedData(examples, dropped, truncated, rows.source, column, report,
                         unknown / response_tokens if response_tokens else 0.0, rows.notes, rows, with_rejected)


def prompt_text(data: TokenizedData, example: Example) -> str:
    """The prompt of an example as its row wrote it (the last turn before the answer), for people to read."""
    if data.rows is None or example.row_index is None:
        return ""
    row = data.rows.rows[example.row_index]
    prompt_messages = (to_preference(row, False)[0] if data.column == PAIRS
                       else to_conversation(row, data.column)[0])
    return prompt_messages[-1]["content"] if prompt_messages else ""


def load_examples(
    path: str, split: str | None, tokenizer: Any, cfg: DataConfig, key: str = "data.path", with_rejected: bool = False
) -> TokenizedData:
    return tokenize_dataset(load_rows(path, split, key), tokenizer, cfg, with_rejected)


def held_out_set(
    cfg: DataConfig, data: TokenizedData, tokenizer: Any, seed: int
) -> tuple[list[Example], list[Example], str, str | None]:
    """(training examples, eval examples, where the eval set comes from, a line saying so).

    `holdout` sets `eval_size` examples (at most a tenth) of the training data aside, never trained on; the
    config resolves a bundled eval set paired with other data to `holdout` (config/sources.py). The held-out
    examples keep their `row_index`, so the rows themselves can be written out (RUN/held_out.jsonl).
    """
    path = cfg.eval_path
    if not path:
        return data.examples, [], "", None
    if path != HOLDOUT:
        examples = load_examples(path, None, tokenizer, cfg, key="data.eval_path").examples[: cfg.eval_size]
        return data.examples, examples, path, None
    count = min(cfg.eval_size, len(data.examples) // 10)
    if count == 0:
        return data.examples, [], "", f"eval: none: {len(data.examples)} examples are too few to hold 10% out"
    train, held_out = set_aside(data.examples, count, seed, "held_out")
    source = f"held out from {cfg.path}"
    return train, held_out, source, f"eval: {count} examples {source}, not trained on"
