"""Activation checkpointing is really on in every policy update where the config asks for it.

Counted, not assumed: `recompute_counter` counts the decoder-layer forwards that autograd
recomputes in backward. The tiny model has 2 layers and these runs 1 micro-batch a step, so a
checkpointed update recomputes exactly 2 layer calls, an unchecked one 0. Before training set the
train mode explicitly, a run that never went through a generation or evaluation (SFT without a
held-out set, a resumed run between generations, every rank above 0) trained unchecked.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port
from recompute_counter import install, read_counts
from rich.console import Console

from sapo_lite.config.sources import load_config
from sapo_lite.train.loop import train

LAYERS = 2
COMMON = ["model.gradient_checkpointing=true", "data.eval_path=null", "train.save_every=3", "train.warmup_steps=1",
          "sapo.gen_per_step=4", "sapo.gen_batch_size=4", "train.micro_batch=4", "train.grad_accum=1",
          "train.num_threads=1"]


def run_counting(run_dir: Path, counts: Path, overrides: list[str], resume: bool = False) -> dict[int, int]:
    cfg = load_config(None, run_dir / "config.yaml", overrides) if resume else load_config("tiny", None, overrides)
    train(cfg, run_dir, Console(quiet=True), resume=resume)
    return read_counts(counts)


@pytest.fixture
def counting(tmp_path, monkeypatch):
    counts = tmp_path / "recomputed.jsonl"
    install(counts, monkeypatch.setattr)
    return counts


@pytest.mark.parametrize("loss", ["sft", "dpo", "orpo"])
def test_every_fresh_update_is_checkpointed(tmp_path, counting, loss):
    counts = run_counting(tmp_path / "run", counting, [*COMMON, f"loss.name={loss}", "train.max_steps=3"])
    assert counts == {1: LAYERS, 2: LAYERS, 3: LAYERS}


def test_without_checkpointing_nothing_is_recomputed(tmp_path, counting):
    overrides = [*COMMON, "model.gradient_checkpointing=false", "loss.name=sft", "train.max_steps=2"]
    assert run_counting(tmp_path / "run", counting, overrides) == {1: 0, 2: 0}


@pytest.mark.parametrize("loss", ["sft", "dpo"])
def test_a_resumed_run_between_generations_is_checkpointed(tmp_path, counting, loss):
    """Generations at steps 1, 4, 7 (every 3); resumed at step 4, steps 5 and 6 train from the buffer
    alone: the first updates after the resume come before any generation or evaluation ran."""
    run = tmp_path / "run"
    overrides = [*COMMON, f"loss.name={loss}", "sapo.generate_every=3", "train.max_steps=4"]
    run_counting(run, counting, overrides)
    counting.unlink()
    counts = run_counting(run, counting, ["train.max_steps=6"], resume=True)
    assert counts == {5: LAYERS, 6: LAYERS}


@pytest.mark.slow
def test_rank_one_of_two_processes_is_checkpointed(tmp_path):
    """SFT under torchrun: rank 1 never runs the held-out evaluation, which used to be what set train mode."""
    script = Path(__file__).with_name("recompute_counter.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(free_port()), str(script), str(tmp_path),
               "train", "--preset", "tiny", "--out", str(tmp_path / "run"),
               *COMMON, "loss.name=sft", "train.max_steps=2", "data.eval_path=holdout", "data.eval_size=8"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert read_counts(tmp_path / f"recomputed-rank{rank}.jsonl") == {1: LAYERS, 2: LAYERS}, rank
