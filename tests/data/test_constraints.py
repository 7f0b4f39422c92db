"""Every constraint checker on passing and failing texts, including what a chat model really writes."""

import json
import re
from pathlib import Path

import pytest

from sapo_lite.data.constraints import CHECKERS, answer_correct, check
from sapo_lite.errors import DataError

ASSETS = Path(__file__).resolve().parents[2] / "sapo_lite" / "assets"

# (constraint, texts that satisfy it, texts that do not)
CASES = [
    ({"kind": "all_lowercase"},
     ["the capital of france is paris.", "  yes, 12 plus 3 is 15.\n", '{"answer": "paris"}'],
     ["The capital is paris.", "paris IS nice", "12 + 3 = 15", ""]),
    ({"kind": "all_uppercase"},
     ["THE CAPITAL IS PARIS.", "YES! 2 TIMES 3 IS 6.\n\n", "- RED\n- BLUE"],
     ["THE CAPITAL IS Paris.", "12", "hello"]),
    ({"kind": "no_commas"},
     ["Paris is the capital of France.", "one two three"],
     ["Paris, the capital.", "1,000"]),
    ({"kind": "max_words", "n": 5},
     ["It is Paris.", "The capital is Paris indeed.  ", "it's 12 - yes"],
     ["The capital of France is Paris.", "", "..."]),
    ({"kind": "end_with", "word": "done"},
     ["That is all. Done", "That is all. Done.", "That is all done!  \n", 'I am "done"', "It is **Done**."],
     ["Done. That is all.", "It is undone.", "done and dusted", ""]),
    ({"kind": "start_yes_no"},
     ["Yes. Paris is the capital.", "No, it is Lyon.", "yes it is", "**No.** It is 12.", "  NO"],
     ["Nothing is wrong.", "Yesterday it was.", "Paris. Yes.", "I think yes."]),
    ({"kind": "include_word", "word": "indeed"},
     ["Indeed it is Paris.", "It is Paris, indeed.", "INDEED"],
     ["It is Paris.", "Indeedly so."]),
    ({"kind": "bullet_count", "n": 3},
     ["- a\n- b\n- c", "* a\n* b\n* c\n", "  - a\n  - b\n\n  - c  ", "\u2022 a\n\u2022 b\n\u2022 c"],
     ["- a\n- b", "- a\n- b\n- c\n- d", "Here you go:\n- a\n- b\n- c", "1. a\n2. b\n3. c", "-a\n-b\n-c"]),
    ({"kind": "sentence_count", "n": 2},
     ["Paris is the capital. It is in France.", "It is 3.5 metres long. That is all!", "Yes. It is 12",
      "Really?! Yes.  "],
     ["Paris is the capital.", "One. Two. Three.", "", "It is 3.5 metres long."]),
    ({"kind": "json_key", "key": "answer"},
     ['{"answer": "Paris"}', ' {"answer": 12, "unit": "none"} \n', '```json\n{"answer": "Paris"}\n```',
      '```\n{"answer": "Paris"}\n```'],
     ['{"result": "Paris"}', 'The answer: {"answer": "Paris"}', '["answer"]', '{"answer": "Paris"',
      '```json\n{"answer": "Paris"}\n``` and more']),
]


def test_every_registered_kind_is_tested():
    assert {case[0]["kind"] for case in CASES} == set(CHECKERS)
    assert len(CHECKERS) >= 8


@pytest.mark.parametrize(("constraint", "passing", "failing"), CASES, ids=[c[0]["kind"] for c in CASES])
def test_checker_accepts_and_rejects(constraint, passing, failing):
    for text in passing:
        assert check(text, constraint), f"{constraint} should accept {text!r}"
    for text in failing:
        assert not check(text, constraint), f"{constraint} should reject {text!r}"


def test_checkers_are_plain_functions_with_keyword_parameters():
    assert CHECKERS["all_lowercase"]("hello there")
    assert CHECKERS["bullet_count"]("- a\n- b", n=2)
    assert not CHECKERS["end_with"]("the end", word="start")


def test_none_parameters_are_ignored_as_datasets_fills_them_in():
    assert check("hello", {"kind": "all_lowercase", "n": None, "word": None, "key": None})
    assert check("- a\n- b", {"kind": "bullet_count", "n": 2, "word": None})


def test_unknown_kind_and_bad_parameters_are_data_errors():
    with pytest.raises(DataError, match="unknown constraint kind `haiku`") as info:
        check("text", {"kind": "haiku"})
    assert "all_lowercase" in info.value.hint
    with pytest.raises(DataError, match="bullet_count"):
        check("- a", {"kind": "bullet_count"})  # n missing
    with pytest.raises(DataError, match="all_lowercase"):
        check("a", {"kind": "all_lowercase", "n": 3})  # a parameter the kind does not take


def test_answer_correct_is_case_insensitive_containment():
    assert answer_correct("THE CAPITAL IS PARIS.", "Paris")
    assert answer_correct('{"answer": "new delhi"}', "New Delhi")
    assert not answer_correct("The capital is Lyon.", "Paris")


@pytest.mark.parametrize("name", ["instruct", "instruct-eval"])
def test_bundled_chosen_responses_satisfy_their_constraints(name):
    rows = [json.loads(line) for line in (ASSETS / f"{name}.jsonl").read_text().splitlines()]
    assert len(rows) == {"instruct": 2000, "instruct-eval": 200}[name]
    for row in rows:
        assert row["constraints"], row
        assert all(check(row["response"], c) for c in row["constraints"]), row
        assert answer_correct(row["response"], row["answer"]), row
    assert {c["kind"] for row in rows for c in row["constraints"]} == set(CHECKERS)


def _instruction_sentences(prompt: str) -> set[str]:
    """The constraint wording of a prompt: after its one-sentence question, parameters masked."""
    instructions = re.split(r"(?<=[.?])\s", prompt, maxsplit=1)[1]
    masked = re.sub(r'"[^"]*"|\b\d+\b|\b(?:one|two|three|four|five|six|seven|eight|nine|ten)\b', "#", instructions)
    return {s.strip() for s in re.split(r"(?<=[.!?])\s", masked) if s.strip()}


def test_held_out_prompts_are_unseen_and_phrased_differently():
    train = [json.loads(line) for line in (ASSETS / "instruct.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (ASSETS / "instruct-eval.jsonl").read_text().splitlines()]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    train_wording = set().union(*(_instruction_sentences(r["prompt"]) for r in train))
    held_wording = set().union(*(_instruction_sentences(r["prompt"]) for r in held))
    assert len(train_wording) >= 30 and len(held_wording) >= 20
    assert not train_wording & held_wording
