"""Skipped updates (non-finite loss or gradient) are counted across a resume as if the run never stopped."""

import pytest
from rich.console import Console

from sapo_lite.config.sources import load_config
from sapo_lite.errors import TrainingDiverged
from sapo_lite.run.records import read_metrics
from sapo_lite.train import loop

GEN_PER_STEP = 8
OVERRIDES = ["loss.name=dpo", "data.eval_path=null", "train.num_threads=1", f"sapo.gen_per_step={GEN_PER_STEP}",
             f"sapo.gen_batch_size={GEN_PER_STEP}", "train.micro_batch=8", "train.max_steps=6", "train.save_every=3",
             "train.max_bad_steps=3"]


def poison_steps(monkeypatch, steps: set[int]) -> None:
    """Make the updates of `steps` non-finite (as an fp16 overflow would), whichever process runs them."""
    real = loop._policy_update

    def update(session, buffer, loss_spec):
        step = session.stream.position()["index"] // GEN_PER_STEP  # examples taken so far: this step's number
        result = real(session, buffer, loss_spec)
        if step in steps:
            session.optimizer.zero_grad(set_to_none=True)
            result.applied = False
        return result

    monkeypatch.setattr(loop, "_policy_update", update)


def test_the_abort_after_max_bad_steps_counts_the_steps_before_the_resume(tmp_path, monkeypatch):
    """Steps 2, 3 and 4 skipped with max_bad_steps=3: the run stops at step 4, also when it was resumed from its
    step-3 checkpoint (before, the counters restarted at 0 and the resumed run trained on)."""
    poison_steps(monkeypatch, {2, 3, 4})
    cfg = load_config("tiny", overrides=OVERRIDES)
    straight = tmp_path / "straight"
    with pytest.raises(TrainingDiverged, match="3 steps in a row \\(last at step 4\\)"):
        loop.train(cfg, straight, Console(quiet=True))
    assert [r["skipped_steps"] for r in read_metrics(straight / "metrics.jsonl")] == [0, 1, 2, 3]

    with pytest.raises(TrainingDiverged, match="3 steps in a row \\(last at step 4\\)"):
        loop.train(load_config(None, straight / "config.yaml"), straight, Console(quiet=True), resume=True)
    assert [r["skipped_steps"] for r in read_metrics(straight / "metrics.jsonl")] == [0, 1, 2, 3]


def test_skipped_steps_keep_counting_after_a_resume(tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2, 5})
    cfg = load_config("tiny", overrides=OVERRIDES)
    loop.train(cfg, tmp_path / "run", Console(quiet=True))
    straight = [r["skipped_steps"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert straight == [0, 1, 1, 1, 2, 2]
    # Resume a copy from its step-3 checkpoint: steps 4-6 count on from the 1 skip before it.
    import shutil

    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-6")
    (tmp_path / "again" / "summary.json").unlink()
    loop.train(load_config(None, tmp_path / "again" / "config.yaml"), tmp_path / "again", Console(quiet=True),
               resume=True)
    assert [r["skipped_steps"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl")] == straight
