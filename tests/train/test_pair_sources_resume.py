"""Each `sapo.pairs` mode trains end to end on preference data, and a SIGKILL + resume logs the same losses."""

from __future__ import annotations

import json
import signal

import pytest
from helpers import start_paused, write_jsonl
from typer.testing import CliRunner

from sapo_lite.cli import app

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed

MODES = {
    "data": ["sapo.pairs=data", "loss.name=dpo", "loss.beta=0.1"],
    # with a validation split: its real pairs are scored beside the EMA's rewrites
    "mix": ["sapo.pairs=mix", "sapo.mix_share=0.3", "data.val_size=8", "train.eval_every=2"],
    # iterations of 3 steps: resumed from checkpoint 2, step 3 generates with the previous iterate the checkpoint
    # kept (the `ref` adapter), and step 4 opens iteration 2
    "spin": ["sapo.pairs=spin", "loss.name=dpo", "loss.beta=0.1", "sapo.spin_iteration_steps=3",
             "sapo.spin_max_new_tokens=6"],
}
SMALL = ["--preset", "tiny", "data.path=pairs.jsonl", "data.eval_path=null", "train.warmup_steps=1",
         "train.num_threads=1", "sapo.gen_per_step=8", "sapo.gen_batch_size=8", "train.micro_batch=8",
         "train.max_steps=4", "train.save_every=2"]


def metrics(run_dir) -> dict[int, float]:
    """step -> loss of every trained step (a validation pass before training logs a step 0 without one)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps  # no step logged twice
    return {r["step"]: r["loss"] for r in records if r["step"] > 0}


def pairs_file(folder) -> None:
    """Digit reversal as preference data: the reversed digits against the digits as given."""
    from pathlib import Path

    from sapo_lite.data.files import resolve_path

    rows = []
    for line in Path(resolve_path("bundled:tiny-reverse")).read_text(encoding="utf-8").splitlines()[:64]:
        row = json.loads(line)
        digits = row["prompt"].split(":")[1].strip()
        rows.append({"prompt": row["prompt"], "chosen": row["response"],
                     "rejected": digits if digits != row["response"] else f"{digits} 0"})
    write_jsonl(folder / "pairs.jsonl", rows)


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_resumes_after_sigkill_with_the_same_losses(tmp_path, monkeypatch, mode):
    pairs_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, *MODES[mode]]
    straight = CliRunner().invoke(app, ["train", *args, "--out", "straight"])
    assert straight.exit_code == 0, straight.output
    read = "examples from pairs.jsonl" if mode == "spin" else "pairs from pairs.jsonl"  # spin reads chosen only
    assert read in straight.output

    proc, _ = start_paused(tmp_path, "training:3", "train", *args, "--out", "killed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert sorted(metrics(tmp_path / "killed")) == [1, 2]
    resumed = CliRunner().invoke(app, ["train", "--resume", "killed"])
    assert resumed.exit_code == 0, resumed.output
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "straight")  # every step's loss, exactly

    import sqlite3

    origins = dict(sqlite3.connect(tmp_path / "killed" / "buffer.sqlite").execute(
        "SELECT origin, COUNT(*) FROM pairs GROUP BY origin").fetchall())
    expected = {"data": {"data"}, "mix": {"data", "ema"}, "spin": {"spin"}}[mode]
    assert set(origins) == expected
    if mode == "mix":  # margin and accuracy on real pairs apart from self-made ones, in metrics and validation
        lines = (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
        records = {r["step"]: r for r in map(json.loads, lines)}
        assert {"rewards/accuracies/data", "rewards/accuracies/ema", "pairs/from_data"} <= set(records[3])
        assert {"val/accuracy/data", "val/margin/data", "val/accuracy"} <= set(records[2])
