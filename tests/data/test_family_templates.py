"""Each family's published chat template (models/families/, sapo_lite/assets/chat-*.jinja) drives the data:
its end-of-turn token stops answers and rewrites, Qwen3's thinking tags never enter a scored answer, and a
system message is kept where the family's template puts it (Gemma 3: folded into the first user turn)."""

import pytest

from sapo_lite.data.examples import stop_token_ids, tokenize_conversation
from sapo_lite.data.rows import RowProblem
from sapo_lite.models.families import FAMILIES
from sapo_lite.models.tiny_families import build_family_tokenizer

PROMPT = [{"role": "system", "content": "copy"}, {"role": "user", "content": "reverse : 1 2 3"}]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_answers_end_at_the_familys_end_of_turn_token(family):
    tokenizer = build_family_tokenizer(family)
    end_of_turn = tokenizer.convert_tokens_to_ids(FAMILIES[family].markers.end_of_turn)
    stops = stop_token_ids(tokenizer)
    assert end_of_turn in stops  # the EMA's rewrites and every answer stop there
    prompt_ids, response_ids = tokenize_conversation(tokenizer, PROMPT, "3 2 1", stops)
    assert response_ids[-1] == end_of_turn
    assert tokenizer.decode(response_ids, skip_special_tokens=True).split() == ["3", "2", "1"]
    assert "copy" in tokenizer.decode(prompt_ids)  # the system message is never dropped


def test_qwen3_answers_carry_no_think_tags_and_render_as_its_template_does():
    tokenizer = build_family_tokenizer("qwen3")
    think = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    prompt_ids, response_ids = tokenize_conversation(tokenizer, PROMPT, "3 2 1", stop_token_ids(tokenizer))
    assert not set(think) & set(response_ids)  # a rewrite of any segment of it writes no stray </think>
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")  # Qwen3's own
    # empty block: the prompt says "answer without thinking"
    rendered = tokenizer.apply_chat_template([*PROMPT, {"role": "assistant", "content": "3 2 1"}], tokenize=False)
    assert rendered.endswith("<|im_end|>\n")  # the turn as Qwen3's template renders it, up to its end-of-turn:
    assert tokenizer(rendered[:-1], add_special_tokens=False)["input_ids"] == prompt_ids + response_ids


def test_a_qwen3_answer_with_its_own_think_block_is_skipped_with_the_reason():
    tokenizer = build_family_tokenizer("qwen3")
    with pytest.raises(RowProblem, match="<think> block"):
        tokenize_conversation(tokenizer, PROMPT, "<think> a b </think> 3 2 1", stop_token_ids(tokenizer))


def test_gemma_folds_a_system_message_into_the_first_user_turn():
    tokenizer = build_family_tokenizer("gemma3")
    prompt_ids, _ = tokenize_conversation(tokenizer, PROMPT, "3 2 1", stop_token_ids(tokenizer))
    text = tokenizer.decode(prompt_ids)
    assert text.startswith("<bos><start_of_turn>user\ncopy\n\nreverse : 1 2 3<end_of_turn>")  # no system turn
    assert text.count("<start_of_turn>") == 2 and text.endswith("<start_of_turn>model\n")
