"""The DPO reference, checked against what it stands for: cached log-probs equal a fresh forward of the reference."""

import json
import math

import pytest
import torch
from rich.console import Console

from sapo_lite.config.schema import ModelConfig
from sapo_lite.config.sources import load_config
from sapo_lite.models.roles import load_base
from sapo_lite.run.records import read_metrics
from sapo_lite.sapo.buffer import ReplayBuffer
from sapo_lite.sapo.pair_logps import pair_logps
from sapo_lite.train.loop import train

DPO = ["loss.name=dpo", "loss.beta=0.1", "data.eval_path=null", "train.num_threads=1", "sapo.gen_per_step=8",
       "sapo.gen_batch_size=8", "train.micro_batch=8", "train.warmup_steps=2"]


def reference_logps(base_dir, pairs, adapter_dir=None):
    """A fresh model (the base, or base + a saved adapter) scoring the stored pairs, chosen and rejected apart."""
    model = load_base(ModelConfig(quant="none"), str(base_dir), torch.device("cpu")).eval()
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(model, pairs, 0, torch.device("cpu"), shared_prefix=False)
    return chosen, rejected


def cached(buffer_path):
    buffer = ReplayBuffer(buffer_path, 10_000)
    try:
        return buffer.all_pairs()
    finally:
        buffer.close()


def assert_cache_matches(pairs, chosen, rejected):
    stored_c = torch.tensor([p.ref_logp_chosen for p in pairs])
    stored_r = torch.tensor([p.ref_logp_rejected for p in pairs])
    assert torch.allclose(stored_c, chosen, atol=2e-4, rtol=1e-5)
    assert torch.allclose(stored_r, rejected, atol=2e-4, rtol=1e-5)


def test_cached_reference_logps_are_the_bases_and_the_first_dpo_step_is_log_2(tmp_path):
    """Reference = adapters off; computed in the packed layout when a pair enters, compared here with a fresh
    base model scoring chosen and rejected apart. At step 1 the policy equals the reference: loss log 2, rewards 0."""
    cfg = load_config("tiny", overrides=[*DPO, "train.max_steps=3", "train.save_every=0"])
    train(cfg, tmp_path, Console(quiet=True))
    pairs = cached(tmp_path / "buffer.sqlite")
    assert len(pairs) == 24
    assert_cache_matches(pairs, *reference_logps(tmp_path / "base_model", pairs))
    first = read_metrics(tmp_path / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0


def test_after_a_reference_refresh_the_cache_is_the_refreshed_references(tmp_path):
    """With the EMA copied into the reference every 2 steps, every cached value left at the end is the last
    reference's (stale ones were cleared and recomputed when drawn), checked against that `ref` adapter."""
    cfg = load_config("tiny", overrides=[*DPO, "sapo.ref_refresh_steps=2", "train.max_steps=5", "train.save_every=5"])
    train(cfg, tmp_path, Console(quiet=True))
    pairs = [p for p in cached(tmp_path / "buffer.sqlite") if p.ref_logp_chosen is not None]
    assert pairs  # the last step's draws were recomputed against the refreshed reference
    ref_adapter = tmp_path / "checkpoints" / "step-5" / "adapters" / "ref"
    chosen, rejected = reference_logps(tmp_path / "base_model", pairs, ref_adapter)
    assert_cache_matches(pairs, chosen, rejected)
    base_chosen, _ = reference_logps(tmp_path / "base_model", pairs)
    assert not torch.allclose(chosen, base_chosen, atol=1e-3)  # the refreshed reference is not the base


@pytest.mark.slow
def test_each_ranks_cached_reference_is_the_bases(tmp_path):
    """Two processes: each rank computes its own pairs' reference log-probs; both equal the base's."""
    import subprocess
    import sys

    from helpers import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "sapo_lite", "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
               *DPO, "train.max_steps=2", "train.save_every=0"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        pairs = cached(tmp_path / "run" / f"buffer-rank{rank}.sqlite")
        assert len(pairs) == 16
        assert_cache_matches(pairs, *reference_logps(tmp_path / "run" / "base_model", pairs))
    records = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert records["loss"] == pytest.approx(math.log(2), abs=1e-7)
