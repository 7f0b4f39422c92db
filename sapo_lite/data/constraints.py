"""Checkable instruction constraints: a registry of small pure functions, one per kind.

A constraint is a dict such as `{"kind": "bullet_count", "n": 3}`; `check(text, constraint)`
looks the kind up in `CHECKERS` and passes the other keys as keyword arguments. Every checker
takes the model's answer as decoded text and returns a bool.

Decisions about what a model actually writes (each tested in tests/data/test_constraints.py):
- Surrounding whitespace never counts: answers are stripped first.
- Case rules count letters only: digits, punctuation and JSON braces are neither case.
  A text with no letters at all fails both `all_lowercase` and `all_uppercase`.
- Words are runs of letters, digits and apostrophes (`it's` is one word, `-` is none).
- `end_with` ignores trailing punctuation, quotes and markdown emphasis (`... done.` and
  `... **Done**!` end with "done") and compares case-insensitively.
- `start_yes_no` accepts "Yes"/"No" in any case, followed by anything but another letter
  ("No." and "yes, ..." pass, "Nothing ..." and "Yesterday ..." fail).
- `bullet_count` counts lines that start with `-`, `*` or `•` and a space (markdown bullets),
  after leading indentation; numbered lines are not bullets. Every non-empty line must be a
  bullet, so a preamble ("Here are three points:") fails, as in IFEval's strict variant.
- `json_key` wants the whole answer to be one JSON object holding the key; a single
  surrounding code fence (```json ... ``` or ``` ... ```) is allowed, since chat models add one
  by habit and the content is still exactly the object.
- `sentence_count` splits after `.`, `!` or `?` followed by whitespace or the end, so a
  decimal point ("3.5") does not end a sentence; a final sentence without a stop still counts.

Answer correctness (`answer_correct`) is case-insensitive containment of the reference answer
in the response: lenient on purpose, because the constraints change the answer's wording
("PARIS", `{"answer": "Paris"}`, "- The capital is Paris").
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import DataError

_WORD = re.compile(r"[A-Za-z0-9']+")
_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S")
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)")
_FENCE = re.compile(r"^```[A-Za-z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_TRAILING = " \t\n.!?,;:\"'*_)`"


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def all_lowercase(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.isupper() for c in letters)


def all_uppercase(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and not any(c.islower() for c in letters)


def no_commas(text: str) -> bool:
    return "," not in text


def max_words(text: str, n: int) -> bool:
    return 0 < len(words(text)) <= n


def end_with(text: str, word: str) -> bool:
    tail, word = text.strip().rstrip(_TRAILING).lower(), word.strip().lower()
    if not word or not tail.endswith(word):
        return False
    before = tail[: len(tail) - len(word)]
    return not before or not (before[-1].isalnum() or before[-1] == "'")  # "undone" does not end with "done"


def start_yes_no(text: str) -> bool:
    return re.match(r"^[\s*_\"']*(yes|no)(?![A-Za-z])", text, re.IGNORECASE) is not None


def include_word(text: str, word: str) -> bool:
    return word.lower() in (w.lower() for w in words(text))


def bullet_count(text: str, n: int) -> bool:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return len(lines) == n and all(_BULLET.match(line) for line in lines)


def sentence_count(text: str, n: int) -> bool:
    text = text.strip()
    if not words(text):
        return False
    parts = [p for p in _SENTENCE_END.split(text) if words(p)]
    return len(parts) == n


def json_key(text: str, key: str) -> bool:
    text = text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(value, dict) and key in value


CHECKERS: dict[str, Callable[..., bool]] = {
    "all_lowercase": all_lowercase,
    "all_uppercase": all_uppercase,
    "no_commas": no_commas,
    "max_words": max_words,
    "end_with": end_with,
    "start_yes_no": start_yes_no,
    "include_word": include_word,
    "bullet_count": bullet_count,
    "sentence_count": sentence_count,
    "json_key": json_key,
}


def constraint_params(constraint: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a constraint: every key but `kind`, without None values.

    `datasets` turns a column of differently shaped dicts into one struct whose missing keys
    are None, so a None means "not a parameter of this kind".
    """
    return {k: v for k, v in constraint.items() if k != "kind" and v is not None}


def check(text: str, constraint: Mapping[str, Any]) -> bool:
    """Whether `text` satisfies one constraint; an unknown kind or bad parameters is a DataError."""
    kind = constraint.get("kind")
    checker = CHECKERS.get(kind)  # type: ignore[arg-type]
    if checker is None:
        raise DataError(
            f"unknown constraint kind `{kind}`", f"known kinds: {', '.join(sorted(CHECKERS))}"
        )
    params = constraint_params(constraint)
    try:
        return checker(text, **params)
    except TypeError as exc:
        raise DataError(
            f"constraint `{kind}` got parameters {sorted(params)}: {exc}",
            "see sapo_lite/data/constraints.py for the parameters each kind takes",
        ) from exc


def answer_correct(text: str, answer: str) -> bool:
    """Case-insensitive containment of the reference answer in the response."""
    return answer.strip().lower() in text.lower()
