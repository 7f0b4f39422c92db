"""The validation split: carved out of the training data, scored on schedule, the best step kept, early stopping."""

import json
import signal

import numpy as np
import pytest
import torch
from helpers import run, start_paused
from rich.console import Console
from safetensors.torch import load_file

from sapo_lite.config.sources import load_config
from sapo_lite.run.records import read_metrics
from sapo_lite.train import loop, validation
from sapo_lite.train.session import setup_session
from sapo_lite.train.validation import BestStep, split_validation

VAL = ["data.val_size=40", "train.eval_every=5", "data.eval_size=30", "train.warmup_steps=2", "train.num_threads=1",
       "sapo.gen_per_step=8", "sapo.gen_batch_size=8", "train.micro_batch=8"]


def key(example) -> tuple:
    return tuple(example.prompt_ids.tolist()) + (-1,) + tuple(example.response_ids.tolist())


def test_the_split_is_disjoint_from_training_and_held_out_rows(tmp_path):
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=holdout"])
    session = setup_session(cfg, tmp_path, Console(quiet=True))
    train_rows = {key(e) for e in session.stream.examples}
    val_rows = {key(e) for e in session.val_examples}
    held_out = {key(e) for e in session.eval_examples}
    assert len(val_rows) == 40 and len(held_out) == 30
    assert not val_rows & train_rows and not val_rows & held_out and not held_out & train_rows
    assert len(train_rows) + 40 + 30 == 4000
    drawn = {key(e) for e in session.stream.take(400)}  # what the run actually trains on
    assert not drawn & val_rows


def test_the_split_has_its_own_stream_and_a_limit():
    examples = list(range(100))
    train, val = split_validation(examples, 10, seed=3)
    assert sorted(train + val) == examples and len(val) == 10
    assert split_validation(examples, 10, seed=3) == (train, val)  # seeded
    assert split_validation(examples, 10, seed=4)[1] != val
    with pytest.raises(Exception, match="more than half"):
        split_validation(examples, 60, seed=3)


@pytest.mark.parametrize("metric,values,best", [
    ("val/nll", [3.0, 2.5, 2.6, 2.4], [0, 5, 5, 15]),
    ("val/constraints", [0.2, 0.2, 0.3, 0.25], [0, 0, 10, 10]),  # a tie is not an improvement
])
def test_the_best_step_follows_the_metric_direction(metric, values, best):
    tracker = BestStep(metric)
    seen = []
    for step, value in zip((0, 5, 10, 15), values):
        tracker.update(step, value)
        seen.append(tracker.step)
    assert seen == best


def test_validation_runs_on_its_schedule_and_early_stopping_stops_where_patience_says(tmp_path, monkeypatch):
    """Scripted figures: best at step 5, no better at 10 and 15: patience 2 stops after step 15 of 40."""
    script = iter([3.0, 2.5, 2.6, 2.7, 2.0])

    def scripted(self):
        return {"val/nll": next(script), "val/accuracy": 0.5, "val/margin": 0.0, "val_s": 0.0}

    monkeypatch.setattr(validation.Validation, "score", scripted)
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "train.max_steps=40", "train.patience=2",
                                         "train.save_every=0"])
    result = loop.train(cfg, tmp_path, Console(quiet=True))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val/nll" in r] == [0, 5, 10, 15]
    assert [r["step"] for r in records][-1] == 15 and result.steps == 15
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == 5 and summary["best_value"] == 2.5 and summary["early_stopped_at"] == 15
    assert json.loads((tmp_path / "adapters" / "best" / "best.json").read_text())["step"] == 5


def policy_tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def test_adapters_best_is_the_policy_of_the_best_step(tmp_path):
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "train.max_steps=20", "train.save_every=5",
                                         "train.keep_checkpoints=10", "train.best_metric=val/nll"])
    loop.train(cfg, tmp_path, Console(quiet=True))
    summary = json.loads((tmp_path / "summary.json").read_text())
    best_step = summary["best_step"]
    records = {r["step"]: r for r in read_metrics(tmp_path / "metrics.jsonl")}
    scores = {s: r["val/nll"] for s, r in records.items() if "val/nll" in r}
    assert best_step == min(scores, key=scores.get) and summary["best_value"] == scores[best_step]
    best = policy_tensors(tmp_path / "adapters" / "best")
    at_step = policy_tensors(tmp_path / "checkpoints" / f"step-{best_step}" / "adapters" / "policy")
    assert best.keys() == at_step.keys() and all(torch.equal(best[k], at_step[k]) for k in best)
    final = policy_tensors(tmp_path / "adapters" / "policy")
    if best_step != 20:
        assert any(not torch.equal(best[k], final[k]) for k in best)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "best"))  # plain peft loads it


def figures(run_dir) -> dict[int, dict]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(("val/", "loss"))}
            for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("straight")
    run(cwd, "train", "--preset", "tiny", *VAL, *STEPS, "--out", "run")
    return cwd / "run"


STEPS = ["data.eval_path=null", "train.max_steps=16", "train.save_every=6", "loss.name=dpo", "loss.beta=0.1",
         "train.best_metric=val/margin"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["training:13", "best-save:3"])
def test_a_kill_between_or_during_validation_resumes_to_the_same_figures_and_best(tmp_path, straight, phase):
    """Killed at step 13 (after the pass at 10, checkpoint at 12) or while the best adapter of step 10 is written:
    the resumed run logs the same losses and validation figures, and keeps the same best adapter."""
    proc, _ = start_paused(tmp_path, phase, "train", "--preset", "tiny", *VAL, *STEPS, "--out", "run")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    run(tmp_path, "train", "--resume", "run")
    out = tmp_path / "run"
    assert figures(out) == figures(straight)
    best, expected = policy_tensors(out / "adapters" / "best"), policy_tensors(straight / "adapters" / "best")
    assert all(torch.equal(best[k], expected[k]) for k in expected)
    assert json.loads((out / "summary.json").read_text())["best_step"] == \
        json.loads((straight / "summary.json").read_text())["best_step"]
    assert not [p.name for p in out.rglob(".tmp-*")] and not [p.name for p in out.rglob(".del-*")]


def test_validation_pairs_are_made_once_and_read_back(tmp_path):
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "train.max_steps=5", "train.save_every=0"])
    loop.train(cfg, tmp_path, Console(quiet=True))
    from sapo_lite.sapo.buffer import ReplayBuffer

    store = ReplayBuffer(tmp_path / "validation.sqlite", 40)
    pairs = store.all_pairs()
    store.close()
    assert len(pairs) == 40 and all(p.ref_logp_chosen is not None for p in pairs)
    assert any(not np.array_equal(p.chosen_ids, p.rejected_ids) for p in pairs)
