"""Load SFT-style data (prompt + good response) and tokenize it through a chat template.

Accepted shapes, auto-detected or chosen with `data.column`:
- a message-list column such as the paper's `chosen`: the last assistant turn is the response,
  everything before it the prompt;
- a `messages` column of the same form;
- `prompt` and `response` text columns.

Optional `constraints` (a list of checkable instructions, see constraints.py) and `answer`
columns travel with each example, for evaluation.

The response keeps its end-of-turn token (EOS): SAPO's EMA may end a rewritten segment
early by emitting it, and the trained policy must learn where answers stop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .config import DataConfig
from .constraints import check
from .errors import DataError

BUNDLED_PREFIX = "bundled:"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SHAPES_HELP = "a message-list column (`chosen` or `messages`), or `prompt` and `response` text columns"

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
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "</s>", "<|endoftext|>")


@dataclass
class Example:
    """One tokenized example: prompt ids (with BOS where the template wants it) and response ids."""

    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_text: str
    constraints: list[dict] | None = None  # checkable instructions (sapo_lite/constraints.py), when the data has them
    answer: str | None = None  # the reference answer, when the data has one


@dataclass
class TokenizedData:
    examples: list[Example]
    dropped_long_prompt: int
    truncated_response: int
    source: str


# ---------------------------------------------------------------- loading rows


def resolve_path(path: str) -> str:
    """`bundled:NAME` -> the packaged file; anything else is returned unchanged."""
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    assets = resources.files("sapo_lite") / "assets"
    for suffix in (".jsonl", ".json"):
        candidate = assets / f"{name}{suffix}"
        if candidate.is_file():
            return str(candidate)
    available = sorted(p.name.rsplit(".", 1)[0] for p in assets.iterdir() if p.name.endswith(".jsonl"))
    raise DataError(f"no bundled dataset `{name}`", f"bundled datasets: {', '.join(available)}")


def load_rows(path: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a local json/jsonl/parquet file or a hub dataset name."""
    import datasets

    path = resolve_path(path)
    local = Path(path)
    looks_local = local.suffix in LOCAL_FORMATS or path.startswith((".", "/", "~"))
    if looks_local:
        local = local.expanduser()
        if not local.is_file():
            raise DataError(f"data file `{local}` does not exist", "check `data.path`")
        if local.stat().st_size == 0:
            raise DataError(f"data file `{local}` is empty", "point `data.path` at a file with examples")
        if local.suffix == ".jsonl":
            _check_jsonl(local)
        fmt = LOCAL_FORMATS.get(local.suffix)
        if fmt is None:
            raise DataError(f"data file `{local}` has an unknown format", "use .json, .jsonl or .parquet")
        try:
            rows = datasets.load_dataset(fmt, data_files=str(local), split="train")
        except Exception as exc:  # datasets wraps parser errors in many types
            raise DataError(f"cannot read `{local}`: {str(exc).splitlines()[0]}") from exc
    else:
        try:
            rows = datasets.load_dataset(path, split=split)
        except Exception as exc:
            offline = any(word in str(exc).lower() for word in ("offline", "connect", "reach"))
            hint = ("no network (or offline mode): use a local json/jsonl/parquet file, or a dataset already "
                    "in the Hugging Face cache" if offline else "check `data.path`")
            raise DataError(f"cannot load dataset `{path}`: {str(exc).splitlines()[0]}", hint) from exc
    if len(rows) == 0:
        raise DataError(f"dataset `{path}` has no rows", "point `data.path` at data with examples")
    return rows


def _check_jsonl(path: Path) -> None:
    """Name the first malformed line, which `datasets` does not."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"`{path}` line {number} is not valid JSON ({exc.msg})", "fix or remove that line"
                ) from exc


# ---------------------------------------------------------------- shapes


def detect_column(columns: list[str], column: str | None) -> str:
    """The message-list column to use, or `prompt/response` for the text-pair shape."""
    if column:
        if column not in columns:
            raise DataError(
                f"column `{column}` not found; columns: {', '.join(columns)}", "set `data.column`"
            )
        return column
    for candidate in ("chosen", "messages", "conversations"):
        if candidate in columns:
            return candidate
    if "prompt" in columns and "response" in columns:
        return "prompt/response"
    raise DataError(
        f"no usable column; found: {', '.join(columns) or 'none'}",
        f"expected {SHAPES_HELP}, or name one with `data.column`",
    )


def to_conversation(row: dict[str, Any], column: str) -> tuple[list[dict[str, str]], str]:
    """(prompt messages, response text) from one row."""
    if column == "prompt/response":
        return [{"role": "user", "content": str(row["prompt"])}], str(row["response"])
    messages = row[column]
    if isinstance(messages, str):
        raise DataError(f"column `{column}` holds text, not a message list", f"expected {SHAPES_HELP}")
    messages = [_normalise_message(m) for m in messages]
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"a row of `{column}` does not end with an assistant turn", f"expected {SHAPES_HELP}")
    return messages[:-1], messages[-1]["content"]


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
                            "see sapo_lite/constraints.py for the kinds and their parameters")
        constraints = [{k: v for k, v in c.items() if v is not None} for c in constraints]
        for constraint in constraints:
            check("", constraint)
    answer = row.get("answer")
    return constraints or None, None if answer is None else str(answer)


def _normalise_message(message: dict[str, Any]) -> dict[str, str]:
    # ShareGPT-style rows use from/value and human/gpt.
    role = message.get("role", message.get("from"))
    content = message.get("content", message.get("value"))
    role = {"human": "user", "gpt": "assistant"}.get(role, role)
    return {"role": str(role), "content": str(content)}


# ---------------------------------------------------------------- chat template


def install_chat_template(tokenizer: Any, chat_template: str | None) -> None:
    """Set the tokenizer's template from `data.chat_template`; fail when none is usable."""
    if chat_template:
        if chat_template in BUILTIN_TEMPLATES:
            tokenizer.chat_template = BUILTIN_TEMPLATES[chat_template]
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


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an answer: EOS plus the template's end-of-turn marker."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[tok] for tok in END_OF_TURN_TOKENS if tok in vocab)
    return sorted(ids)


def render_prompt_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Prompt ids with the generation prompt, and BOS exactly once when the model expects one."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
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
    prompt_ids = render_prompt_ids(tokenizer, prompt_messages)
    prompt_text = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        [*prompt_messages, {"role": "assistant", "content": response}], tokenize=False
    )
    if full_text.startswith(prompt_text):
        response_text = full_text[len(prompt_text) :]
    else:  # a template that rewrites earlier turns: fall back to the raw answer
        response_text = response
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    # Keep the answer up to and including its last stop token (drops a trailing "\n").
    last_stop = max((i for i, tok in enumerate(response_ids) if tok in stops), default=None)
    if last_stop is None:
        response_ids = [*response_ids, stops[0]] if stops else response_ids
    else:
        response_ids = response_ids[: last_stop + 1]
    return prompt_ids, response_ids


def tokenize_dataset(rows: Any, tokenizer: Any, cfg: DataConfig, source: str) -> TokenizedData:
    """Tokenize every row; drop long prompts, cut long responses, and count both."""
    column = detect_column(list(rows.column_names), cfg.column)
    stops = stop_token_ids(tokenizer)
    examples: list[Example] = []
    dropped = truncated = 0
    for row in rows:
        prompt_messages, response = to_conversation(row, column)
        prompt_ids, response_ids = tokenize_conversation(tokenizer, prompt_messages, response, stops)
        if len(prompt_ids) > cfg.max_prompt_len:
            dropped += 1
            continue
        room = cfg.max_len - len(prompt_ids)
        if len(response_ids) > room:
            response_ids = response_ids[:room]
            truncated += 1
        examples.append(Example(
            np.asarray(prompt_ids, np.int32), np.asarray(response_ids, np.int32), response.strip(),
            *row_metadata(row),
        ))
        if cfg.max_examples is not None and len(examples) >= cfg.max_examples:
            break
    if not examples:
        raise DataError(
            f"every one of the {dropped} prompts in `{source}` is longer than "
            f"data.max_prompt_len={cfg.max_prompt_len} tokens",
            "raise `data.max_prompt_len` (and `data.max_len`) or use shorter prompts",
        )
    return TokenizedData(examples, dropped, truncated, source)


def load_examples(path: str, split: str, tokenizer: Any, cfg: DataConfig) -> TokenizedData:
    rows = load_rows(path, split)
    return tokenize_dataset(rows, tokenizer, cfg, path)
