"""The validation split: carved out of the training data, scored on schedule, the best step kept, early stopping."""

import io
import json
import signal

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
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=holdout", "data.max_examples=1000"])
    session = setup_session(cfg, tmp_path, Console(quiet=True))
    train_rows = {key(e) for e in session.stream.examples}
    val_rows = {key(e) for e in session.val_examples}
    held_out = {key(e) for e in session.eval_examples}
    assert len(val_rows) == 40 and len(held_out) == 30
    assert not val_rows & train_rows and not val_rows & held_out and not held_out & train_rows
    assert len(train_rows) + 40 + 30 == 1000
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


def scripted_nll(monkeypatch, values):
    """Validation passes that report `values` as val/nll, one a pass (the adapters are the run's real ones)."""
    script = iter(values)

    def scripted(self):
        return {"val/nll": next(script), "val/accuracy": 0.5, "val/margin": 0.0, "val_s": 0.0}

    monkeypatch.setattr(validation.Validation, "score", scripted)


def policy_tensors(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


def assert_best_is_the_policy_of(run_dir, step):
    """adapters/best holds that step's policy tensors (its checkpoint's), not the final policy's."""
    best = policy_tensors(run_dir / "adapters" / "best")
    at_step = policy_tensors(run_dir / "checkpoints" / f"step-{step}" / "adapters" / "policy")
    final = policy_tensors(run_dir / "adapters" / "policy")
    assert best.keys() == at_step.keys() and all(torch.equal(best[k], at_step[k]) for k in best)
    assert any(not torch.equal(best[k], final[k]) for k in best)
    assert json.loads((run_dir / "adapters" / "best" / "best.json").read_text())["step"] == step


def test_validation_runs_on_its_schedule_and_early_stopping_stops_where_patience_says(tmp_path, monkeypatch):
    """Scripted figures: best at step 5, no better at 10 and 15: patience 2 stops after step 15 of 40, and
    adapters/best is step 5's policy."""
    scripted_nll(monkeypatch, [3.0, 2.5, 2.6, 2.7, 2.0])
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "train.max_steps=40", "train.patience=2",
                                         "train.save_every=5", "train.keep_checkpoints=5"])
    result = loop.train(cfg, tmp_path, Console(quiet=True))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val/nll" in r] == [0, 5, 10, 15]
    assert [r["step"] for r in records][-1] == 15 and result.steps == 15
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == 5 and summary["best_value"] == 2.5 and summary["early_stopped_at"] == 15
    assert_best_is_the_policy_of(tmp_path, 5)


def test_the_last_step_is_validated_and_adapters_best_is_an_earlier_steps_policy(tmp_path, monkeypatch):
    """7 steps, a pass every 3: passes at 0, 3, 6 and the last step, 7; the best is step 3's. Patience runs out
    at the last pass, where the run ends anyway: that is no early stop."""
    scripted_nll(monkeypatch, [3.0, 2.0, 2.5, 2.4])
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "train.max_steps=7", "train.eval_every=3",
                                         "train.save_every=3", "train.keep_checkpoints=5", "train.best_metric=val/nll",
                                         "train.patience=2"])
    loop.train(cfg, tmp_path, Console(quiet=True))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records if "val/nll" in r] == [0, 3, 6, 7]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == 3 and "early_stopped_at" not in summary
    assert_best_is_the_policy_of(tmp_path, 3)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base_model")
    PeftModel.from_pretrained(base, str(tmp_path / "adapters" / "best"))  # plain peft loads it


def test_a_run_shorter_than_eval_every_warns_and_is_validated_at_its_end(tmp_path):
    out = io.StringIO()
    cfg = load_config("tiny", overrides=[*VAL, "data.eval_path=null", "data.val_size=8", "train.max_steps=3",
                                         "train.save_every=0", "data.max_examples=200"])
    loop.train(cfg, tmp_path, Console(file=out, width=300))
    assert ("warning: train.eval_every=5 is not below train.max_steps=3: the policy is validated only before "
            "training and after step 3") in out.getvalue()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/nll" in r] == [0, 3]


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


class FakeCuda:
    """Two CUDA devices' generator states, for torch's own `fork_rng` and `manual_seed` to read and reseed on a
    machine without CUDA (the states are what a real card's generator would hold)."""

    def __init__(self, monkeypatch):
        self.states = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: 2)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.states[int(device)].clone())
        monkeypatch.setattr(cuda, "set_rng_state",
                            lambda state, device="cuda": self.states.update({int(device): state}))
        monkeypatch.setattr(cuda, "manual_seed_all", lambda seed: self.states.update(
            {d: torch.tensor([seed % 256], dtype=torch.uint8) for d in self.states}))


@pytest.fixture(scope="module")
def hf_session(tmp_path_factory):
    """A tiny session that decodes with transformers' generate and a static cache, and a validation split of 8."""
    cfg = load_config("tiny", overrides=[*VAL, "data.val_size=8", "data.eval_path=null", "data.max_examples=200",
                                         "sapo.decoder=hf", "sapo.static_cache=true"])
    return setup_session(cfg, tmp_path_factory.mktemp("hf"), Console(quiet=True))


def test_a_validation_pass_leaves_every_devices_generator_as_it_was(hf_session, monkeypatch):
    """The EMA samples the same after a pass (its pairs made, or the policy scored) as without one: the CPU's
    generator and every CUDA device's come back as they were, whatever the pass's own seed did to them."""
    cuda = FakeCuda(monkeypatch)
    torch.manual_seed(1)
    without = torch.rand(4)
    torch.manual_seed(1)
    cuda.states = {0: torch.tensor([10], dtype=torch.uint8), 1: torch.tensor([11], dtype=torch.uint8)}
    watch = validation.ValidationWatch(hf_session, {})  # makes the validation pairs: the EMA samples
    watch.before_training()
    assert torch.equal(torch.rand(4), without)
    assert {d: int(s) for d, s in cuda.states.items()} == {0: 10, 1: 11}


def test_validation_answers_and_pairs_decode_as_the_run_says(hf_session, monkeypatch):
    """sapo.decoder=hf: neither the pairs nor the greedy answers of a pass go through the lean decoder."""
    from sapo_lite.models import generation
    from sapo_lite.sapo import augment

    def lean(*args, **kwargs):
        raise AssertionError("the lean decoder ran although sapo.decoder=hf")

    monkeypatch.setattr(augment, "plan_for", lean)
    monkeypatch.setattr(generation, "plan_for", lean)
    (hf_session.run_dir / "validation.sqlite").unlink(missing_ok=True)
    watch = validation.ValidationWatch(hf_session, {})
    watch.validation.has_constraints = True  # the answers are decoded for rows with constraints only
    figures = watch.before_training()
    assert len(watch.validation.pairs) == 8 and "val/constraints" in figures
