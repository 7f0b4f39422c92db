"""The data split is decided once, when a run starts: a resume that would move rows is refused before the
model loads, and RUN/validation.sqlite is read back only when it holds the pairs of the validation rows."""

import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from helpers import fails, runner

from sapo_lite.cli import app
from sapo_lite.sapo.buffer import ReplayBuffer
from sapo_lite.train import validation

# MEASUREMENTS.md's reproduction, on a file of one's own (400 rows of the tiny task) and shrunk to seconds.
START = ["--preset", "tiny", "data.eval_path=holdout", "data.eval_size=30", "data.val_size=20",
         "train.eval_every=2", "train.max_steps=2", "train.num_threads=1", "train.warmup_steps=2",
         "data.eval_max_new_tokens=4", "sapo.gen_per_step=8", "sapo.gen_batch_size=8", "train.micro_batch=8"]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A two-step run on its own data file, validated at 0 and 2, 30 rows held out: (run, data file)."""
    folder = tmp_path_factory.mktemp("split")
    data = folder / "rows.jsonl"
    source = Path(validation.__file__).parents[1] / "assets" / "tiny-reverse.jsonl"
    data.write_text("".join(source.read_text().splitlines(keepends=True)[:400]))
    result = runner.invoke(app, ["train", *START, f"data.path={data}", "--out", str(folder / "run")])
    assert result.exit_code == 0, result.output
    return folder / "run", data


def copy_of(started, tmp_path):
    run, data = started
    shutil.copytree(run, tmp_path / "run")
    shutil.copy(data, tmp_path / "rows.jsonl")
    for name in ("config.yaml", "split.json"):  # the copy's own data file, as if it had started on it
        if (path := tmp_path / "run" / name).is_file():
            path.write_text(path.read_text().replace(str(data), str(tmp_path / "rows.jsonl")))
    return tmp_path / "run", tmp_path / "rows.jsonl"


def test_a_resume_that_changes_eval_size_is_refused_and_the_held_out_rows_stay(started, tmp_path):
    run, _ = copy_of(started, tmp_path)
    held_out = (run / "held_out.jsonl").read_text()
    metrics = (run / "metrics.jsonl").read_text()
    output = fails(["train", "--resume", str(run), "train.max_steps=10", "data.eval_size=40"],
                   "`data.eval_size` cannot change when resuming", "data.eval_size=30", "data.eval_size=40", "--out")
    assert "model:" not in output  # refused before anything loads
    assert (run / "held_out.jsonl").read_text() == held_out and (run / "metrics.jsonl").read_text() == metrics
    assert len(held_out.splitlines()) == 30
    # The same value again is no change, and resumes.
    result = runner.invoke(app, ["train", "--resume", str(run), "train.max_steps=3", "data.eval_size=30"])
    assert result.exit_code == 0, result.output
    assert (run / "held_out.jsonl").read_text() == held_out


def test_a_resume_on_changed_data_is_refused_before_the_model_loads(started, tmp_path):
    run, data = copy_of(started, tmp_path)
    rows = data.read_text().splitlines()
    rows[7] = '{"prompt": "reverse : 1 2 3", "response": "3 2 1"}'  # same count, one row different
    data.write_text("\n".join(rows) + "\n")
    output = fails(["train", "--resume", str(run), "train.max_steps=10"], "are not the ones this run started with",
                   "start a new run with --out")
    assert "model:" not in output


def stored_pairs(run):
    store = ReplayBuffer(run / "validation.sqlite", 20)
    try:
        return store.all_pairs()
    finally:
        store.close()


def test_validation_pairs_are_read_back_on_resume_and_made_again_only_when_they_are_not_the_rows(
        started, tmp_path, monkeypatch):
    run, _ = copy_of(started, tmp_path)
    made = []
    real = validation.self_augment
    monkeypatch.setattr(validation, "self_augment", lambda *a, **k: made.append(1) or real(*a, **k))
    before = stored_pairs(run)
    assert len(before) == 20 and all(p.ref_logp_chosen is not None for p in before)

    result = runner.invoke(app, ["train", "--resume", str(run), "train.max_steps=3"])
    assert result.exit_code == 0, result.output
    assert made == []  # read back, not made again
    after = stored_pairs(run)
    assert all(np.array_equal(a.rejected_ids, b.rejected_ids) for a, b in zip(before, after))

    # As many pairs, but one of them not of a validation row (a store of another split): made again, said so.
    db = sqlite3.connect(run / "validation.sqlite")
    with db:
        db.execute("UPDATE pair_tokens SET chosen_ids = (SELECT chosen_ids FROM pair_tokens ORDER BY id DESC LIMIT 1)"
                   " WHERE id = (SELECT MIN(id) FROM pair_tokens)")
    db.close()
    result = runner.invoke(app, ["train", "--resume", str(run), "train.max_steps=4"])
    assert result.exit_code == 0, result.output
    assert made == [1] and "validation.sqlite does not hold the pairs of these 20 validation rows" in result.output
    remade = stored_pairs(run)
    assert len(remade) == 20 and np.array_equal(remade[0].chosen_ids, before[0].chosen_ids)
