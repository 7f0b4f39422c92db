"""Every model family trains: its tiny model (models/tiny_families.py) through the real loop, two steps each.

One run a family with a rotating loss and precision: the five families with a GPU preset run that preset's
own settings (NF4 with double quantisation, bf16 compute, gradient checkpointing, `all-linear`, its
optimizer and batch shape; lengths shrunk, the paper's hub data replaced by a local file of the same
`chosen` shape), Qwen2.5 in fp32. Each checks what a user would see: the adapter covers the family's own
linear layers (Phi's fused `qkv_proj` and `gate_up_proj`), it moved, and the EMA's rewrites went through
the lean decoder. Qwen3 in fp32 is killed in a step and resumed to the same losses."""

import json
import signal
from io import StringIO

import pytest
import torch
from helpers import run, start_paused
from rich.console import Console
from safetensors.torch import load_file

from sapo_lite.config.sources import load_config, preset_names
from sapo_lite.models.families import FAMILIES
from sapo_lite.models.tiny_families import build_family_base
from sapo_lite.train.loop import train

pytestmark = pytest.mark.slow  # seven short runs, NF4 on the CPU, one killed and resumed

SHRUNK = ["data.max_len=80", "data.max_prompt_len=64", "sapo.segment_len=6", "data.eval_path=null",
          "train.max_steps=2", "train.save_every=0", "train.warmup_steps=1", "train.num_threads=1",
          "sapo.gen_per_step=4", "sapo.gen_batch_size=4", "train.micro_batch=2", "train.grad_accum=1"]
CASES = [  # family, preset, overrides: each loss on NF4 + checkpointing, and fp32
    ("llama3", "llama31-8b-qlora", []),
    ("qwen3", "qwen3-8b-qlora", ["loss.name=orpo", "loss.beta=0.1"]),
    ("gemma3", "gemma3-12b-qlora", ["loss.name=sft"]),
    ("phi4-mini", "phi4-mini-qlora", ["loss.name=orpo", "loss.beta=0.1"]),
    ("mistral-nemo", "mistral-nemo-12b-qlora", []),
    ("qwen2.5", "tiny", ["loss.name=dpo", "loss.beta=0.1"]),
]
LLAMA_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
FUSED_LINEARS = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


@pytest.fixture(scope="module")
def chosen_file(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "chosen.jsonl"
    with path.open("w") as handle:
        for _ in range(32):
            digits = [str(rng.randint(0, 9)) for _ in range(5)]
            chosen = [{"role": "user", "content": "reverse : " + " ".join(digits)},
                      {"role": "assistant", "content": " ".join(reversed(digits))}]
            handle.write(json.dumps({"chosen": chosen}) + "\n")
    return path


def family_args(tmp_path_factory, family, chosen_file):
    base = build_family_base(family, tmp_path_factory.getbasetemp() / f"tiny-{family}")
    return [f"model.name={base}", f"data.path={chosen_file}", *SHRUNK]


def test_every_familys_preset_is_trained_here():
    presets = {preset for _, preset, _ in CASES}
    assert {f.preset for f in FAMILIES.values() if f.preset} <= presets
    assert presets - {"tiny"} <= set(preset_names())


@pytest.mark.parametrize("family, preset, overrides", CASES, ids=[c[0] for c in CASES])
def test_each_family_trains_its_own_linear_layers(tmp_path, tmp_path_factory, chosen_file, family, preset,
                                                  overrides):
    cfg = load_config(preset, overrides=[*family_args(tmp_path_factory, family, chosen_file), *overrides])
    if preset != "tiny":
        assert (cfg.model.quant, cfg.model.double_quant, cfg.model.gradient_checkpointing) == ("nf4", True, True)
    log = StringIO()
    train(cfg, tmp_path, Console(file=log, width=300))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    adapter = json.loads((tmp_path / "adapters" / "policy" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapted == (FUSED_LINEARS if FAMILIES[family].fused_projections else LLAMA_LINEARS)
    weights = load_file(tmp_path / "adapters" / "policy" / "adapter_model.safetensors")
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)  # B starts at zero
    if cfg.loss.name != "sft":
        assert records[-1]["buffer_size"] > 0
        assert "transformers' generate" not in log.getvalue()  # the rewrites ran on the lean decoder


def test_a_new_family_resumes_after_sigkill_with_identical_losses(tmp_path, tmp_path_factory, chosen_file):
    settings = [*family_args(tmp_path_factory, "qwen3", chosen_file), "loss.name=dpo", "loss.beta=0.1",
                "train.max_steps=3", "train.save_every=2"]
    (tmp_path / "straight").mkdir()
    train(load_config("tiny", overrides=settings), tmp_path / "straight", Console(quiet=True))
    proc, _ = start_paused(tmp_path, "training:3", "train", "--preset", "tiny", *settings, "--out", "killed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = run(tmp_path, "train", "--resume", "killed")
    assert "resuming from step-2" in resumed.stdout

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (tmp_path / run_dir / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("straight")) == 3 and losses("killed") == losses("straight")
