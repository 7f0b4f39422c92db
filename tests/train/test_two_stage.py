"""The two-stage recipe as a user writes it: SFT with a validation split, then SAPO from its best adapter."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.run.records import read_metrics

runner = CliRunner()
SHRUNK = ["data.max_examples=40", "data.eval_size=4", "data.eval_max_new_tokens=8",
          "sapo.gen_per_step=2", "sapo.gen_batch_size=2", "train.micro_batch=2", "train.save_every=2"]


@pytest.mark.slow
def test_stage_two_starts_from_stage_ones_best_adapter_with_one_obvious_command(tmp_path):
    """Each stage dequantises the GGUF into its own RUN/base_model; the second recognises the first's base by
    its GGUF source, so `model.init_adapter=A/adapters/best` is all a user adds."""
    first, second = tmp_path / "sft", tmp_path / "sapo"
    result = runner.invoke(app, ["train", "--preset", "smollm2-135m-sft", "--out", str(first), *SHRUNK,
                                 "train.max_steps=4", "data.val_size=8", "train.eval_every=2", "train.patience=1"])
    assert result.exit_code == 0, result.output
    summary = json.loads((first / "summary.json").read_text())
    passes = {r["step"]: r["val/constraints"] for r in read_metrics(first / "metrics.jsonl") if "val/constraints" in r}
    best_step = max(passes, key=lambda step: (passes[step], -step))  # the first of equal figures: a tie is no gain
    assert summary["best_metric"] == "val/constraints"
    assert summary["best_step"] == best_step and summary["best_value"] == passes[best_step]
    best = load_file(str(first / "adapters" / "best" / "adapter_model.safetensors"))
    if best_step:  # the policy of that step, as its checkpoint holds it
        kept = load_file(str(first / "checkpoints" / f"step-{best_step}" / "adapters" / "policy"
                             / "adapter_model.safetensors"))
        assert best.keys() == kept.keys() and all(torch.equal(best[k], kept[k]) for k in best)
    else:  # the untrained start: LoRA B is zero
        assert all(not t.any() for k, t in best.items() if "lora_B" in k)
    assert "validation (8 examples) before training" in result.output

    result = runner.invoke(app, ["train", "--preset", "smollm2-135m", "--out", str(second), *SHRUNK,
                                 f"model.init_adapter={first / 'adapters' / 'best'}", "train.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert "does not match" not in result.output
    # The reference is the stage-1 adapter (a frozen `ref` copy), and the policy started from it.
    ref = load_file(str(second / "checkpoints" / "step-2" / "adapters" / "ref" / "adapter_model.safetensors"))
    best = load_file(str(first / "adapters" / "best" / "adapter_model.safetensors"))
    ref = {k.replace(".ref.", "."): v for k, v in ref.items()}
    assert ref.keys() == best.keys() and all(torch.equal(ref[k], best[k]) for k in best)
