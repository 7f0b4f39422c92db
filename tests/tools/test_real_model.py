"""SmolLM2-135M-Instruct, a real chat model: a few SAPO steps, its tokens, and merge."""

import json
import sqlite3

import numpy as np
import torch
from typer.testing import CliRunner

from sapo_lite.cli import app

runner = CliRunner()
IM_END = "<|im_end|>"


def test_a_few_sapo_steps_on_the_real_model(smollm2_run):
    records = [json.loads(line) for line in (smollm2_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records)
    from safetensors.torch import load_file

    policy = load_file(str(smollm2_run / "adapters" / "policy" / "adapter_model.safetensors"))
    ema = load_file(str(smollm2_run / "adapters" / "ema" / "adapter_model.safetensors"))
    lora_b = [name for name in policy if "lora_B" in name]
    assert lora_b and all(policy[name].abs().sum() > 0 for name in lora_b)  # B starts at 0: the policy trained
    # The EMA trails the policy: averaged at the start of step 2 with the policy of step 1, which the first
    # warm-up step (learning rate 0) left at its start, so it has not caught up with step 2's update.
    assert any(not torch.equal(ema[name], policy[name]) for name in lora_b)
    db = sqlite3.connect(smollm2_run / "buffer.sqlite")
    assert db.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == 4


def test_end_of_turn_is_trained_and_attended_while_padding_is_masked(smollm2_base_dir):
    from sapo_lite.data.examples import stop_token_ids, tokenize_conversation
    from sapo_lite.models.roles import load_tokenizer
    from sapo_lite.sapo.pair_logps import right_pad

    tokenizer = load_tokenizer(str(smollm2_base_dir))
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == im_end  # SmolLM2 uses one token for all three
    assert im_end in stop_token_ids(tokenizer)
    short = tokenize_conversation(tokenizer, [{"role": "user", "content": "Say hi."}], "Hi!", stop_token_ids(tokenizer))
    long = tokenize_conversation(tokenizer, [{"role": "user", "content": "Count to five."}], "1, 2, 3, 4, 5.",
                                 stop_token_ids(tokenizer))
    assert short[1][-1] == long[1][-1] == im_end  # each answer ends with its end-of-turn token
    sequences = [np.array(p + r) for p, r in (short, long)]
    ids, attention, response = right_pad(sequences, [len(short[0]), len(long[0])], tokenizer.pad_token_id)
    end = len(sequences[0]) - 1
    assert ids[0, end] == im_end and attention[0, end] == 1 and response[0, end]  # scored and attended
    assert (ids[0, end + 1 :] == im_end).all()  # padding is the same token id ...
    assert attention[0, end + 1 :].sum() == 0 and not response[0, end + 1 :].any()  # ... but masked out


def test_greedy_answers_stop_at_the_end_of_turn(smollm2_base_dir):
    from transformers import AutoModelForCausalLM

    from sapo_lite.data.examples import render_prompt_ids, stop_token_ids
    from sapo_lite.models.roles import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_base_dir))
    model = AutoModelForCausalLM.from_pretrained(smollm2_base_dir, dtype=torch.float32)
    prompt = render_prompt_ids(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                         eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    answer = out[0, len(prompt):].tolist()
    assert tokenizer.decode(answer) == "The capital of France is Paris." + IM_END  # nothing after the turn ends


def test_merge_folds_the_adapter_into_the_dequantised_base(smollm2_run, tmp_path):
    result = runner.invoke(app, ["merge", str(smollm2_run), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and (tmp_path / "merged" / "chat_template.jinja").is_file()
