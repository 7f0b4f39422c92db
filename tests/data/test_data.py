"""Data shapes, chat templates and length limits."""


import pytest
from helpers import write_jsonl

from sapo_lite.config.schema import DataConfig
from sapo_lite.data.examples import install_chat_template, load_examples, stop_token_ids, to_conversation
from sapo_lite.errors import DataError

CHAT = [{"role": "user", "content": "reverse : 1 2 3"}, {"role": "assistant", "content": "3 2 1"}]


@pytest.mark.parametrize(
    "row",
    [{"chosen": CHAT}, {"messages": CHAT}, {"prompt": "reverse : 1 2 3", "response": "3 2 1"}],
    ids=["chosen", "messages", "prompt-response"],
)
def test_every_accepted_shape_gives_the_same_tokens(tmp_path, tiny_tokenizer, row):
    data = load_examples(str(write_jsonl(tmp_path / "d.jsonl", [row])), "train", tiny_tokenizer, DataConfig())
    (example,) = data.examples
    prompt = tiny_tokenizer.decode(example.prompt_ids.tolist())
    assert prompt.endswith("<|im_start|> assistant") and "1 2 3" in prompt
    assert tiny_tokenizer.decode(example.response_ids.tolist()) == "3 2 1 <|im_end|>"
    assert example.response_ids[-1] in stop_token_ids(tiny_tokenizer)
    assert example.response_text == "3 2 1"


@pytest.mark.parametrize(
    "row,column",
    [({"chosen": [{"role": "user", "content": "\n  reverse : 1 2"}, {"role": "assistant", "content": " 2 1\n"}]},
      "chosen"),
     ({"prompt": "\n  reverse : 1 2", "response": " 2 1\n"}, "prompt/response")],
    ids=["messages", "prompt-response"],
)
def test_every_message_loses_its_leading_whitespace(row, column):
    prompt, response = to_conversation(row, column)
    assert prompt[0]["content"] == "reverse : 1 2" and response == "2 1\n"


def test_long_prompts_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "reverse : " + "1 " * 30, "response": "1"}, {"prompt": "reverse : 1 2", "response": "2 1"}]
    data = load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", tiny_tokenizer,
                         DataConfig(max_len=40, max_prompt_len=20))
    assert len(data.examples) == 1 and data.dropped_long_prompt == 1


def test_every_prompt_too_long_is_a_clear_error(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "reverse : " + "1 " * 30, "response": "1"}]
    with pytest.raises(DataError, match="longer than data.max_prompt_len=20"):
        load_examples(str(write_jsonl(tmp_path / "d.jsonl", rows)), "train", tiny_tokenizer,
                      DataConfig(max_len=40, max_prompt_len=20))


def test_malformed_jsonl_names_the_line(tmp_path, tiny_tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        load_examples(str(path), "train", tiny_tokenizer, DataConfig())


def test_missing_column_lists_what_was_found(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError) as info:
        load_examples(str(write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])), "train",
                      tiny_tokenizer, DataConfig())
    assert "question, answer" in info.value.message and "prompt" in info.value.hint


def test_missing_and_empty_files_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "nope.jsonl"), "train", tiny_tokenizer, DataConfig())
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_examples(str(tmp_path / "empty.jsonl"), "train", tiny_tokenizer, DataConfig())


def test_parquet_loads_too(tmp_path, tiny_tokenizer):
    import datasets

    datasets.Dataset.from_list([{"prompt": "reverse : 1 2", "response": "2 1"}]).to_parquet(tmp_path / "d.parquet")
    data = load_examples(str(tmp_path / "d.parquet"), "train", tiny_tokenizer, DataConfig())
    assert len(data.examples) == 1


def test_no_chat_template_names_the_setting(tiny_base_dir):
    from sapo_lite.models.roles import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_base_dir))
    tokenizer.chat_template = None
    with pytest.raises(DataError) as info:
        install_chat_template(tokenizer, None)
    assert "data.chat_template" in info.value.hint
    install_chat_template(tokenizer, "zephyr")
    text = tokenizer.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
