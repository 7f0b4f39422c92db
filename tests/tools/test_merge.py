"""merge and generate: from a run to a model folder plain transformers loads."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.tools.merge import merge_adapter, nf4_roundtrip

runner = CliRunner()
IDS = torch.tensor([[3, 5, 8, 9, 10, 11, 4, 3, 6, 13, 14, 15, 16]])


def train_tiny(out, *overrides):
    result = runner.invoke(app, ["train", "--out", str(out), "data.eval_path=null", "train.max_steps=30",
                                 "train.save_every=0", *overrides])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "run")


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("runs") / "nf4", "model.quant=nf4")


def peft_logits(run_dir, adapter, quant="none"):
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    kwargs = {}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model", dtype=torch.float32, **kwargs)
    model = PeftModel.from_pretrained(base, run_dir / "adapters" / adapter).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def merged_logits(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("adapter", ["policy", "ema"])
def test_fp32_merge_matches_base_plus_adapter(run, tmp_path, adapter):
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m"), "--adapter", adapter,
                                 "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert (merged_logits(tmp_path / "m") - peft_logits(run, adapter)).abs().max() < 1e-4


@pytest.mark.parametrize("dtype,torch_dtype,tolerance", [("bf16", torch.bfloat16, 0.05), ("fp16", torch.float16, 5e-3)])
def test_half_precision_merges(run, tmp_path, dtype, torch_dtype, tolerance):
    result = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m"), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m" / "config.json").read_text())["dtype"] == {"bf16": "bfloat16",
                                                                                "fp16": "float16"}[dtype]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch_dtype
    assert (merged_logits(tmp_path / "m") - peft_logits(run, "policy")).abs().max() < tolerance


@pytest.mark.slow
def test_merged_folder_loads_without_peft_and_keeps_the_chat_template(run, tmp_path):
    assert runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")]).exit_code == 0
    code = (
        "import sys; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r})\n"
        f"tok = AutoTokenizer.from_pretrained({str(tmp_path / 'm')!r})\n"
        "text = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False)\n"
        "print(type(model).__name__, '<|im_start|>user' in text)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["LlamaForCausalLM", "True"]


def test_merged_folder_chats_and_stops_as_training_did(tmp_path):
    """A run trained in a template other than the base's: the merged folder carries the run's."""
    from transformers import AutoTokenizer, GenerationConfig

    from sapo_lite.data.examples import BUILTIN_TEMPLATES, install_chat_template, stop_token_ids

    zephyr_run = train_tiny(tmp_path / "zephyr", "data.chat_template=zephyr", "train.max_steps=2")
    assert runner.invoke(app, ["merge", str(zephyr_run), "--out", str(tmp_path / "m")]).exit_code == 0
    merged = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert merged.chat_template == BUILTIN_TEMPLATES["zephyr"]
    assert "<|user|>" in merged.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "chat_template" not in json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    trained = AutoTokenizer.from_pretrained(zephyr_run / "base_model")
    install_chat_template(trained, "zephyr")
    eos = GenerationConfig.from_pretrained(tmp_path / "m").eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == stop_token_ids(trained)


def test_shard_by_shard_merge_equals_an_in_memory_merge(run, tmp_path):
    from peft import PeftModel

    sharded = tmp_path / "sharded-base"
    AutoModelForCausalLM.from_pretrained(run / "base_model").save_pretrained(sharded, max_shard_size="150KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(run / "base_model" / name, sharded / name)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3

    report = merge_adapter(sharded, run / "adapters" / "policy", tmp_path / "m", dtype="fp32")
    assert report.shards == len(shards) and report.merged_weights == 14
    assert report.largest_shard_bytes < sum(s.stat().st_size for s in shards) / 2
    assert sorted(p.name for p in (tmp_path / "m").glob("model-*.safetensors")) == [s.name for s in shards]

    in_memory = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded),
                                          run / "adapters" / "policy").merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").state_dict()
    assert merged.keys() == in_memory.keys()
    for key, value in in_memory.items():
        assert torch.allclose(merged[key], value, atol=1e-6), key


@pytest.mark.slow
def test_nf4_roundtrip_is_what_the_4bit_layer_computes_with(nf4_run):
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from transformers import BitsAndBytesConfig

    dense = AutoModelForCausalLM.from_pretrained(nf4_run / "base_model")
    quantised = AutoModelForCausalLM.from_pretrained(nf4_run / "base_model", quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32))
    layer = quantised.model.layers[1].mlp.down_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    seen_in_training = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    roundtrip = nf4_roundtrip(dense.model.layers[1].mlp.down_proj.weight.data, double_quant=True)
    assert torch.equal(roundtrip, seen_in_training)


def test_nf4_roundtrip_merge_is_closer_to_what_was_trained(nf4_run, tmp_path):
    trained = peft_logits(nf4_run, "policy", quant="nf4").log_softmax(-1)
    gaps = {}
    for mode, extra in (("default", []), ("roundtrip", ["--nf4-roundtrip"])):
        assert runner.invoke(app, ["merge", str(nf4_run), "--out", str(tmp_path / mode), "--dtype", "fp32",
                                   *extra]).exit_code == 0
        gaps[mode] = (merged_logits(tmp_path / mode).log_softmax(-1) - trained).abs().mean().item()
    assert gaps["roundtrip"] < 1e-4 < gaps["default"]


def test_generate_shows_every_role_side_by_side(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("reverse : 1 2 3 4\n\nreverse : 5 6 7 8\n")
    result = runner.invoke(app, ["generate", str(run), "--prompt", "reverse : 9 9 1 2", "--prompts-file",
                                 str(prompts), "--max-new-tokens", "8"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "prompt" in line)
    assert all(role in header for role in ("base", "policy", "ema"))
    assert all(p in result.output for p in ("reverse : 9 9 1 2", "reverse : 1 2 3 4", "reverse : 5 6 7 8"))


def answer_table(output):
    """{prompt: [answers...]} from generate's table (one line a row at a wide terminal)."""
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]
    return {row[0]: row[1:] for row in rows}


def test_generate_answers_with_a_merged_folder_as_the_run_policy_does(run, tmp_path):
    merged = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(run), "--out", str(merged), "--dtype", "fp32"]).exit_code == 0
    prompts = ["--prompt", "reverse : 9 9 1 2", "--prompt", "reverse : 3 1 4", "--max-new-tokens", "8"]
    from_run = runner.invoke(app, ["generate", str(run), "--adapter", "base,policy", *prompts],
                             env={"COLUMNS": "200"})
    from_merged = runner.invoke(app, ["generate", str(merged), *prompts], env={"COLUMNS": "200"})
    assert from_merged.exit_code == 0, from_merged.output
    header = next(line for line in from_merged.output.splitlines() if "prompt" in line)
    assert "answer" in header and "policy" not in header  # one answer column: the merged model
    merged_answers, run_answers = answer_table(from_merged.output), answer_table(from_run.output)
    assert set(merged_answers) == {"reverse : 9 9 1 2", "reverse : 3 1 4"}
    assert {p: [policy] for p, (_, policy) in run_answers.items()} == merged_answers  # the policy, folded in
    assert {p: [base] for p, (base, _) in run_answers.items()} != merged_answers


def test_generate_answers_with_any_model_folder_in_its_own_chat_template(run):
    prompts = ["--prompt", "reverse : 9 9 1 2", "--max-new-tokens", "8"]
    base_folder = run / "base_model"  # a plain Hugging Face folder: config.json, weights, tokenizer, chat template
    plain = runner.invoke(app, ["generate", str(base_folder), *prompts], env={"COLUMNS": "200"})
    from_run = runner.invoke(app, ["generate", str(run), "--adapter", "base", *prompts], env={"COLUMNS": "200"})
    assert plain.exit_code == 0, plain.output
    assert answer_table(plain.output) == answer_table(from_run.output)


def test_generate_on_a_folder_it_cannot_use_says_what_it_takes(run, tmp_path):
    from helpers import fails

    fails(["generate", str(tmp_path), "--prompt", "hi"], "is neither a sapo-lite run (no config.yaml) nor a model "
          "folder (no config.json)", "sapo-lite merge")
    fails(["generate", str(run / "base_model"), "--prompt", "hi", "--adapter", "policy"],
          "is a model folder, not a run", "drop --adapter")
    no_template = tmp_path / "bare"
    shutil.copytree(run / "base_model", no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    fails(["generate", str(no_template), "--prompt", "hi"], "carries no chat template")


def test_merge_errors(run, tmp_path):
    not_a_run = runner.invoke(app, ["merge", str(tmp_path), "--out", str(tmp_path / "m")])
    assert not_a_run.exit_code == 1 and "is not a sapo-lite run" in not_a_run.stderr
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("x")
    exists = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "m")])
    assert exists.exit_code == 1 and "--overwrite" in exists.stderr
    assert (tmp_path / "m" / "keep.txt").read_text() == "x"
    bad_adapter = runner.invoke(app, ["merge", str(run), "--out", str(tmp_path / "n"), "--adapter", "ref"])
    assert bad_adapter.exit_code == 1 and "--adapter policy" in bad_adapter.stderr
