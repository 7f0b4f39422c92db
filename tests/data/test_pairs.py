"""Preference data: chosen + rejected rows in TRL's explicit and implicit prompt conventions, and bad rows."""

from __future__ import annotations

import pytest
from helpers import write_jsonl

from sapo_lite.config.schema import DataConfig
from sapo_lite.data.examples import load_examples
from sapo_lite.errors import DataError

CFG = DataConfig(max_len=64, max_prompt_len=48, max_bad_share=0.5)


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


SHAPES = {
    "explicit text": {"prompt": "reverse : 1 2", "chosen": "2 1", "rejected": "1 2"},
    "explicit messages": {"prompt": [user("reverse : 1 2")], "chosen": [assistant("2 1")],
                          "rejected": [assistant("1 2")]},
    "implicit messages": {"chosen": [user("reverse : 1 2"), assistant("2 1")],
                          "rejected": [user("reverse : 1 2"), assistant("1 2")]},
    # the paper's data: a `prompt` in text beside whole conversations, which TRL reads as implicit
    "implicit messages, text prompt beside": {"prompt": "reverse : 1 2",
                                              "chosen": [user("reverse : 1 2"), assistant("2 1")],
                                              "rejected": [user("reverse : 1 2"), assistant("1 2")]},
    "implicit text": {"chosen": "reverse : 1 2 answer: 2 1", "rejected": "reverse : 1 2 answer: 1 2"},
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_each_convention_reads_the_same_pair(tmp_path, tiny_tokenizer, shape):
    path = write_jsonl(tmp_path / "pairs.jsonl", [SHAPES[shape]] * 2)
    data = load_examples(str(path), "train", tiny_tokenizer, CFG, with_rejected=True)
    (example, _) = data.examples
    decode = tiny_tokenizer.decode
    assert "reverse : 1 2" in decode(example.prompt_ids)
    assert decode(example.response_ids).startswith("2 1") and decode(example.rejected_ids).startswith("1 2")
    assert "2 pairs from" in data.describe(CFG) and "preference pairs" in data.describe(CFG)


BAD = [
    ({"prompt": "p", "chosen": "a"}, "rejected is null"),
    ({"prompt": "p", "chosen": "a", "rejected": None}, "rejected is null"),
    ({"prompt": "p", "chosen": "a", "rejected": "  "}, "rejected is empty"),
    ({"prompt": "p", "chosen": "a", "rejected": 3}, "rejected is a number, not text"),
    ({"prompt": "p", "chosen": "same answer", "rejected": "same answer "}, "rejected is identical to chosen"),
    ({"chosen": [user("p"), assistant("a")], "rejected": [user("q"), assistant("b")]},
     "chosen and rejected have different prompts"),
    ({"chosen": [user("p"), assistant("a")], "rejected": "b"}, "rejected holds text"),
]


def test_every_bad_row_is_skipped_with_its_reason_and_too_many_are_refused(tmp_path, tiny_tokenizer):
    good = SHAPES["explicit text"]
    rows = [good] * 8 + [row for row, _ in BAD]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    data = load_examples(str(path), "train", tiny_tokenizer, CFG, with_rejected=True)
    assert len(data.examples) == 8
    line = data.describe(CFG)
    assert f"{len(BAD)} rows skipped" in line
    for _, reason in BAD:
        assert reason in line, reason
    with pytest.raises(DataError, match=r"7 of 15 rows .* more than data.max_bad_share=0.2"):
        load_examples(str(path), "train", tiny_tokenizer, DataConfig(max_len=64, max_prompt_len=48, max_bad_share=0.2),
                      with_rejected=True)


def test_a_run_on_the_chosen_answers_alone_reads_pairs_without_judging_the_rejected(tmp_path, tiny_tokenizer):
    """`sapo.pairs=self` (or spin) on preference data: the rows train on their chosen answers, and a rejected
    answer the run never reads does not cost the row."""
    path = write_jsonl(tmp_path / "pairs.jsonl", [SHAPES["explicit text"], {"prompt": "p", "chosen": "a"}])
    data = load_examples(str(path), "train", tiny_tokenizer, CFG)
    assert len(data.examples) == 2 and all(ex.rejected_ids is None for ex in data.examples)
    assert "the chosen answers only" in data.describe(CFG) and "0 rows skipped" in data.describe(CFG)


def test_a_run_on_the_datas_pairs_refuses_data_without_rejected_answers(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "response": "a"}])
    with pytest.raises(DataError, match=r"no `chosen` and `rejected` columns; columns: prompt, response") as error:
        load_examples(str(path), "train", tiny_tokenizer, CFG, with_rejected=True)
    assert "sapo.pairs=self" in error.value.hint


def test_the_bundled_pairs_break_exactly_one_constraint_each():
    """bundled:instruct-pairs: every chosen answer meets all its constraints, every rejected one fails exactly one,
    the one `broken` names, judged by the package's own checkers; the prompts are bundled:instruct's."""
    import json
    from pathlib import Path

    from sapo_lite.data.constraints import check
    from sapo_lite.data.files import resolve_path

    def rows(name: str) -> list[dict]:
        return [json.loads(line) for line in Path(resolve_path(name)).read_text(encoding="utf-8").splitlines()]

    pairs, plain = rows("bundled:instruct-pairs"), rows("bundled:instruct")
    assert [p["prompt"] for p in pairs] == [r["prompt"] for r in plain]
    assert [p["chosen"] for p in pairs] == [r["response"] for r in plain]
    for row in pairs:
        assert all(check(row["chosen"], c) for c in row["constraints"])
        failed = [c["kind"] for c in row["constraints"] if not check(row["rejected"], c)]
        assert failed == [row["broken"]], row
