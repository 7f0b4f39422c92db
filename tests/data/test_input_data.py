"""Data as users write it: the shapes accepted, every unusable row named and counted, unreadable files
as one line. Refusals go through the CLI; accepted shapes through `load_examples` (no training)."""

import json

import pytest
from helpers import fails, write_jsonl
from typer.testing import CliRunner

from sapo_lite.config.schema import DataConfig
from sapo_lite.config.sources import load_config
from sapo_lite.data.examples import held_out_set, load_examples

runner = CliRunner()
GOOD = {"prompt": "reverse : 1 2 3", "response": "3 2 1"}
CHAT = [{"role": "user", "content": "reverse : 1 2 3"}, {"role": "assistant", "content": "3 2 1"}]




def train_on(tmp_path, path, *overrides):
    return ["train", "--out", str(tmp_path / "run"), f"data.path={path}", "data.eval_path=null",
            "train.max_steps=1", *overrides]




def tokens(tokenizer, example):
    return tokenizer.decode(example.prompt_ids.tolist()), tokenizer.decode(example.response_ids.tolist())


# ---------------------------------------------------------------- shapes accepted


@pytest.mark.parametrize("name,text,note", [
    ("d.csv", "prompt,response\nreverse : 1 2 3,3 2 1\n", ""),
    ("d.tsv", "prompt\tresponse\nreverse : 1 2 3\t3 2 1\n", ""),
    ("d.json", json.dumps({"version": 2, "data": [GOOD]}), "rows from key `data`"),
    ("d.json", json.dumps([GOOD]), ""),
    ("d.json", json.dumps(GOOD) + "\n", ""),  # JSON Lines in a .json file
    ("d.jsonl", json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "reverse :"},
                                                                       {"type": "text", "text": "1 2 3"}]},
                                         {"role": "assistant", "content": [{"type": "text", "text": "3 2 1"}]}]}), ""),
], ids=["csv", "tsv", "json-object", "json-list", "json-lines", "content-parts"])
def test_common_file_shapes_give_the_same_example(tmp_path, tiny_tokenizer, name, text, note):
    (tmp_path / name).write_text(text + "\n")
    data = load_examples(str(tmp_path / name), "train", tiny_tokenizer, DataConfig())
    (example,) = data.examples
    prompt, response = tokens(tiny_tokenizer, example)
    assert "1 2 3" in prompt and response == "3 2 1 <|im_end|>"
    line = data.describe(DataConfig())
    assert line.startswith(f"data: 1 examples from {tmp_path / name}") and "0 rows skipped" in line and note in line


def test_a_relative_path_without_dot_slash_and_a_folder_with_splits(tmp_path, tiny_tokenizer, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mydata").mkdir()
    write_jsonl(tmp_path / "mydata" / "train.jsonl", [GOOD, GOOD])
    write_jsonl(tmp_path / "mydata" / "test.jsonl", [GOOD])
    assert len(load_examples("mydata", "train", tiny_tokenizer, DataConfig()).examples) == 2
    assert len(load_examples("./mydata", "test", tiny_tokenizer, DataConfig()).examples) == 1
    assert len(load_examples("mydata/train.jsonl", "train[:1]", tiny_tokenizer, DataConfig()).examples) == 1


@pytest.mark.parametrize("split,expected", [
    ("validation", "data.split=validation does not exist in"),
    ("train[abc]", "is not a split or slice"),
])
def test_a_split_a_local_file_does_not_have_is_refused(tmp_path, split, expected):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    fails(train_on(tmp_path, path, f"data.split={split}"), expected, "data.split")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- rows that cannot be used


BAD_ROWS = [
    ({"prompt": "reverse : 1", "response": None}, "response is null"),
    ({"prompt": "reverse : 1", "response": ""}, "response is empty"),
    ({"prompt": "reverse : 1", "response": 42}, "response is a number, not text"),
    ({"prompt": None, "response": "1"}, "prompt is null"),
    ({"prompt": "reverse : 1", "response": True}, "response is true/false, not text"),
    ({"prompt": "reverse : 1", "response": {"text": "1"}}, "response is an object, not text"),
    ({"prompt": "reverse : 1", "response": "   "}, "response is empty"),
    ({"messages": CHAT}, "no prompt/response (row has a `messages` message list, the rest are prompt/response)"),
]
CHAT_BAD_ROWS = [
    ({"messages": CHAT[:1]}, "last turn is `user`, not the assistant's (roles: user)"),
    ({"messages": [CHAT[0], {"role": "assistant", "content": None}]}, "message 2 (assistant) content is null"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, CHAT[1]]},
     "message 1 (user) content part 1 is `image_url`, not text"),
    ({"messages": []}, "`messages` is an empty list"),
    ({"messages": "reverse : 1"}, "`messages` holds text, not a message list"),
    ({"messages": [{"content": "reverse : 1"}, CHAT[1]]}, "message 1 has no role"),
    ({"messages": [["user", "reverse : 1"], CHAT[1]]}, "message 1 is not an object with role and content"),
    ({"messages": [{"from": "human", "value": "reverse : 1"}, {"from": "gpt", "value": ""}]},
     "message 2 (assistant) content is empty"),
    ({"prompt": "reverse : 1", "response": "1"},
     "`messages` is null (row in prompt/response shape, the rest are message lists)"),
]


@pytest.mark.parametrize("row,reason", BAD_ROWS + CHAT_BAD_ROWS, ids=[r for _, r in BAD_ROWS + CHAT_BAD_ROWS])
def test_each_unusable_row_is_named_and_refused_past_the_share(tmp_path, row, reason):
    good = {"messages": CHAT} if (row, reason) in CHAT_BAD_ROWS else GOOD
    path = write_jsonl(tmp_path / "d.jsonl", [good, row, good])
    fails(train_on(tmp_path, path), "1 of 3 rows", "more than data.max_bad_share=0.05", f"line 2: {reason}",
          "data.max_bad_share")
    assert not (tmp_path / "run").exists()


def test_unusable_rows_under_the_share_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD] * 30 + [{"prompt": "x", "response": None}])
    data = load_examples(str(path), "train", tiny_tokenizer, DataConfig())
    assert len(data.examples) == 30
    assert "1 row skipped (response is null: 1; first: line 31: response is null)" in data.describe(DataConfig())


def test_non_utf8_bytes_name_the_file_and_byte_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "reverse : 1", "response": "1"}\n{"prompt": "caf\xe9", "response": "1"}\n')
    fails(train_on(tmp_path, path), f"`{path}` is not UTF-8 text: byte 0xe9 at byte offset 58 (line 2)", "iconv")


@pytest.mark.parametrize("text,expected", [
    (json.dumps({"a": [GOOD], "b": [GOOD]}), "lists under `a`, `b`: cannot tell which holds the rows"),
    ('[{"prompt": 1,]', "is not valid JSON: Expecting property name enclosed in double quotes at line 1"),
])
def test_json_that_cannot_be_read_as_rows(tmp_path, text, expected):
    (tmp_path / "d.json").write_text(text)
    fails(train_on(tmp_path, tmp_path / "d.json"), expected)


def test_a_folder_without_data_files(tmp_path):
    (tmp_path / "empty").mkdir()
    fails(train_on(tmp_path, tmp_path / "empty"), "is a folder without data files")


# ---------------------------------------------------------------- eval set


def test_a_bundled_eval_set_is_not_used_with_other_data(tmp_path, tiny_tokenizer):
    rows = [{"prompt": f"reverse : {i}", "response": str(i)} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = load_config("tiny", overrides=[f"data.path={path}", "data.eval_size=200"])  # the preset's bundled eval set
    assert cfg.data.eval_path == "holdout"  # decided from the two paths, when the config is resolved
    assert cfg.notes["data.eval_path"].startswith("bundled:tiny-reverse-eval belongs to bundled:tiny-reverse: "
                                                  f"held out from {path} instead")
    data = load_examples(str(path), "train", tiny_tokenizer, cfg.data)
    train, held_out, source, note = held_out_set(cfg.data, data, tiny_tokenizer, seed=0)
    assert (len(train), len(held_out)) == (45, 5) and source == f"held out from {path}"
    assert note == f"eval: 5 examples held out from {path}, not trained on"
    assert not {e.response_text for e in train} & {e.response_text for e in held_out}
    assert [rows[e.row_index]["response"] for e in held_out] == [e.response_text for e in held_out]
    own = load_config("tiny")  # the preset's own bundled data: its bundled eval set stays
    assert own.data.eval_path == "bundled:tiny-reverse-eval" and not own.notes


def test_a_file_of_an_unknown_format(tmp_path):
    (tmp_path / "d.txt").write_text("reverse : 1 2 3 -> 3 2 1\n")
    fails(train_on(tmp_path, tmp_path / "d.txt"), "has an unknown format", ".jsonl, .json, .csv, .tsv, .parquet")
    assert not (tmp_path / "run").exists()
