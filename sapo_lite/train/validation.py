"""The validation split, watched during training, and the best step it picks.

`data.val_size` examples are carved out of the training data (its own random stream, never the
held-out evaluation set, never trained on; train/data_split.py decides and records the split, and a
resume that would change it is refused). Before the first step the EMA, which is then the starting
policy, rewrites each of them once, as training would (same decoder settings): these validation
pairs, with their reference log-probs, are stored in RUN/validation.sqlite, and a resumed run reads
them back and scores the very same pairs. Only if the stored pairs are not those of the validation
rows (the file removed, damaged, or from another split) are they made again, by the EMA as it is
then, and the run says so. The policy is scored before the first step, every `train.eval_every`
steps and at the last step (`train.max_steps`):

- val/nll: mean over examples of the chosen response's NLL per token;
- val/accuracy, val/margin: on the validation pairs, the implicit reward margin
  (pi_c - ref_c) - (pi_r - ref_r) of summed response log-probs, against the run's reference (the
  base, or `model.init_adapter`): its mean, and the share of pairs where it is positive. The same
  measure for every loss, so SFT and SAPO runs are compared on one scale;
- val/accuracy/data, val/margin/data: the same on the data's own pairs of the validation examples, when the
  run reads them (`sapo.pairs` data or mix; stored beside the rewrites): real pairs against self-made ones;
- val/constraints: with greedy answers (`data.eval_max_new_tokens`, decoded as `sapo.decoder` and
  `sapo.static_cache` say), the share of the constraints met, where the rows carry constraints.

Validation never draws from the training streams: it runs under forked torch generators (the CPU's
and every CUDA device's, seeded from its own stream, restored after) and scoring is greedy, so a run
scores the same with or without a kill between two passes, and the EMA samples the same after a pass
as without one. The best step by `train.best_metric` is kept as RUN/adapters/best (the policy
adapter, PEFT format, published atomically, with best.json naming the step and figure);
`train.patience` stops the run after that many passes without a new best.

With several processes, rank 0 alone makes the pairs and scores (the pass is not sharded) and sends
its figures to the others, so every rank keeps the same best step and stops after the same step.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.examples import Example
from ..data.streams import random_stream, set_aside
from ..models.generation import evaluate_role
from ..models.roles import EMA, POLICY, acting_as, reference
from ..run.atomic import publish_folder, removed_on_failure, staging_folder
from ..run.layout import RunDir
from ..run.testhook import pause_point
from ..sapo.augment import FROM_DATA, self_augment
from ..sapo.buffer import ReplayBuffer, StoredPair
from ..sapo.pair_logps import pair_logps
from ..sapo.sources import reads_rejected
from ..sapo.sources.from_data import data_pairs
from .checkpoint import save_adapters

HIGHER_IS_BETTER = {"val/constraints": True, "val/accuracy": True, "val/margin": True, "val/nll": False}
BEST_INFO = "best.json"


def split_validation(examples: Sequence[Example], size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """(training examples, validation examples): `size` examples drawn from their own random stream."""
    if size <= 0:
        return list(examples), []
    if size > len(examples) // 2:
        from ..errors import ConfigError

        raise ConfigError(f"data.val_size={size} would take more than half of the {len(examples)} training examples",
                          f"set data.val_size to at most {len(examples) // 2}")
    return set_aside(examples, size, seed, "validation")


def best_metric_name(requested: str, examples: Sequence[Example]) -> str:
    has_constraints = any(ex.constraints for ex in examples)
    if requested == "auto":
        return "val/constraints" if has_constraints else "val/nll"
    if requested == "val/constraints" and not has_constraints:
        from ..errors import ConfigError

        raise ConfigError("train.best_metric=val/constraints, but the validation rows carry no constraints",
                          "use train.best_metric=val/nll (or auto)")
    return requested


@dataclass
class BestStep:
    """The best validation pass so far and how many passes since; saved in every checkpoint."""

    metric: str
    step: int | None = None
    value: float | None = None
    passes_since: int = 0

    def update(self, step: int, value: float | None) -> bool:
        """Record a pass; True when it is a new best (the first pass always is)."""
        better = value is not None and math.isfinite(value) and (
            self.value is None or (value > self.value if HIGHER_IS_BETTER[self.metric] else value < self.value))
        if better:
            self.step, self.value, self.passes_since = step, value, 0
        else:
            self.passes_since += 1
        return better

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "step": self.step, "value": self.value, "passes_since": self.passes_since}


class Validation:
    """The validation examples, their fixed pairs, and a scorer for the policy (rank 0's, with several processes)."""

    def __init__(self, session: Any, examples: list[Example], console: Any = None) -> None:
        self.session = session
        self.examples = examples
        self.console = console
        self.pairs = self._pairs()
        self.has_constraints = any(ex.constraints for ex in examples)

    def _pairs(self) -> list[StoredPair]:
        """The validation pairs: made before the first step by the starting EMA (with the data's own pairs of
        the same rows when the run reads them) and stored; read back on resume, unless they are not the pairs
        of these examples (then made again by the EMA as it is now)."""
        path = RunDir(self.session.run_dir).validation_pairs
        with_data = reads_rejected(self.session.cfg)
        count = len(self.examples) * (2 if with_data else 1)
        store = ReplayBuffer(path, capacity=max(1, count))
        try:
            stored = store.all_pairs()
            if _pairs_of(stored, self.examples, with_data):
                return stored
            store.close()
            if stored and self.console is not None:
                self.console.print(f"warning: {path.name} does not hold the pairs of these {len(self.examples)} "
                                   "validation rows: making them again with the EMA as it is now", highlight=False)
            path.unlink(missing_ok=True)
            store = ReplayBuffer(path, capacity=count)
            new = self._make_pairs() + (data_pairs(self.examples) if with_data else [])
            store.add(new, 0, self._reference_logps(new))
            return store.all_pairs()
        finally:
            store.close()

    def _make_pairs(self) -> list[Any]:
        """The EMA rewrites each validation example once, as training's generation would."""
        session, cfg = self.session, self.session.cfg
        sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
        rng = random_stream(cfg.train.seed, "validation", 1)
        merged = session.merged_ema or contextlib.nullcontext()
        with isolated_rng(int(rng.integers(2**31))), acting_as(session.model, EMA), session.generating(), merged:
            return self_augment(
                session.model, self.examples, cfg.sapo.segment_len, cfg.data.max_len, session.pad_id,
                session.stop_ids, rng, cfg.sapo.gen_batch_size, sampling, cfg.sapo.static_cache, cfg.sapo.decoder,
                short_rewrite=cfg.sapo.short_rewrite,
            ).pairs

    def _reference_logps(self, pairs: Sequence[Any]) -> list[tuple[float, float]]:
        values: list[tuple[float, float]] = []
        with reference(self.session.model):
            for batch in _batches(pairs, self.session.cfg.train.micro_batch):
                chosen, rejected, _, _ = self._logps(batch)
                values += list(zip(chosen.tolist(), rejected.tolist()))
        return values

    def _logps(self, batch: Sequence[Any]) -> tuple[torch.Tensor, ...]:
        s = self.session
        return pair_logps(s.model, batch, s.pad_id, s.device, s.cfg.train.logps_chunk_tokens)

    @torch.no_grad()
    def score(self) -> dict[str, float]:
        """The policy's validation figures (see the module docstring) and the seconds they took."""
        started = time.perf_counter()
        s = self.session
        nll, margins = [], []
        rewrites = [p for p in self.pairs if p.origin != FROM_DATA]  # the data's pairs repeat the chosen responses
        real = [p for p in self.pairs if p.origin == FROM_DATA]
        with isolated_rng(s.cfg.train.seed), acting_as(s.model, POLICY):
            for batch in _batches(rewrites + real, s.cfg.train.micro_batch):
                chosen, rejected, n_chosen, _ = self._logps(batch)
                ref_c = torch.tensor([p.ref_logp_chosen for p in batch], device=chosen.device)
                ref_r = torch.tensor([p.ref_logp_rejected for p in batch], device=chosen.device)
                nll += (-chosen / n_chosen.clamp(min=1)).tolist()
                margins += ((chosen - ref_c) - (rejected - ref_r)).tolist()
        own, data = np.asarray(margins[: len(rewrites)]), np.asarray(margins[len(rewrites) :])
        figures = {"val/nll": float(np.mean(nll[: len(rewrites)])), "val/accuracy": float(np.mean(own > 0)),
                   "val/margin": float(np.mean(own))}
        if real:
            figures.update({"val/accuracy/data": float(np.mean(data > 0)), "val/margin/data": float(np.mean(data))})
        if self.has_constraints:
            with isolated_rng(s.cfg.train.seed), s.generating():
                score = evaluate_role(s.model, s.tokenizer, self.examples, POLICY, s.cfg.data.eval_max_new_tokens,
                                      s.stop_ids, decoder=s.cfg.sapo.decoder, static_cache=s.cfg.sapo.static_cache)
            figures["val/constraints"] = score.constraints.rate
        figures["val_s"] = time.perf_counter() - started
        return figures


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block on torch generators seeded with `seed`, and put every generator back as it was after it.

    `torch.manual_seed` reseeds the CPU generator and every CUDA device's, but `fork_rng` saves and
    restores only the devices it is given (`devices=[]`: the CPU alone), so the CUDA devices are named,
    all of them: otherwise the EMA's sampling after a pass would follow the pass's seed."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield


def _pairs_of(pairs: Sequence[StoredPair], examples: Sequence[Example], with_data: bool) -> bool:
    """Whether `pairs` are those of `examples`: one rewrite each, in order (and, `with_data`, one pair of the
    data each, in order): the same rows, not only as many."""
    rewrites = [p for p in pairs if p.origin != FROM_DATA]
    real = [p for p in pairs if p.origin == FROM_DATA]
    return _chosen_are(rewrites, examples) and (_chosen_are(real, examples) if with_data else not real)


def _chosen_are(pairs: Sequence[StoredPair], examples: Sequence[Example]) -> bool:
    return len(pairs) == len(examples) and all(
        np.array_equal(p.chosen_ids, np.concatenate([ex.prompt_ids, ex.response_ids]))
        for p, ex in zip(pairs, examples))


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def save_best_adapter(model: Any, run_dir: Path, best: BestStep) -> Path:
    """RUN/adapters/best: the policy adapter of the best step (PEFT format), written atomically."""
    import json

    final = RunDir(run_dir).adapter("best")
    tmp = staging_folder(final)
    with removed_on_failure(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapters(model, tmp, (POLICY,))
        for path in (tmp / POLICY).iterdir():  # peft writes a named adapter into a subfolder: lift it
            path.rename(tmp / path.name)
        (tmp / POLICY).rmdir()
        (tmp / BEST_INFO).write_text(json.dumps(best.to_dict(), indent=2))
        pause_point("best-save")
    return publish_folder(tmp, final, run_dir)


class ValidationWatch:
    """What the loop calls: the passes on schedule, the best step, early stopping; a no-op without a split.

    With several processes every rank keeps a ValidationWatch, but only rank 0 holds the pairs and scores;
    the others receive its figures, so the best step and the decision to stop are the same everywhere."""

    def __init__(self, session: Any, loop_state: dict[str, Any], console: Any = None) -> None:
        cfg = session.cfg
        self.session, self.every, self.patience = session, cfg.train.eval_every, cfg.train.patience
        self.last_step = cfg.train.max_steps
        self.on = bool(session.val_examples)
        self.size = len(session.val_examples)
        scores_here = self.on and session.processes.is_main
        self.validation = Validation(session, session.val_examples, console) if scores_here else None
        metric = best_metric_name(cfg.train.best_metric, session.val_examples) if self.on else ""
        self.best = BestStep(**loop_state["best"]) if loop_state.get("best") else BestStep(metric)
        self.stopped_at: int | None = loop_state.get("patience_stop")

    def before_training(self) -> dict[str, Any] | None:
        """The pass before the first step (step 0): where the best step starts from. None when off."""
        return self._pass(0) if self.on else None

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        """On a validation step (every `eval_every`, and the last): score, add the figures to the step's
        record, keep a new best."""
        if self.on and (step % self.every == 0 or step == self.last_step):
            record.update(self._pass(step))

    def _pass(self, step: int) -> dict[str, Any]:
        processes = self.session.processes
        figures = processes.from_main(self.validation.score() if self.validation is not None else None)
        if self.best.update(step, figures[self.best.metric]) and processes.is_main:
            save_best_adapter(self.session.model, self.session.run_dir, self.best)
        out_of_patience = self.patience and self.best.passes_since >= self.patience
        if out_of_patience and self.stopped_at is None and step < self.last_step:  # the last step ends the run anyway
            self.stopped_at = step
        return {**figures, "val/best_step": self.best.step}

    @property
    def best_adapter(self) -> Path | None:
        """RUN/adapters/best, for the checkpoint to keep a copy of (a resume puts it back)."""
        folder = RunDir(self.session.run_dir).adapter("best")
        return folder if self.on and folder.is_dir() else None

    @property
    def should_stop(self) -> bool:
        """Early stopping: `train.patience` passes without a new best."""
        return self.stopped_at is not None

    def state(self) -> dict[str, Any]:
        return {"best": self.best.to_dict(), "patience_stop": self.stopped_at} if self.on else {}

    def summary(self) -> dict[str, Any]:
        if not self.on:
            return {}
        fields = {"best_step": self.best.step, "best_metric": self.best.metric, "best_value": self.best.value}
        if self.stopped_at is not None:
            fields["early_stopped_at"] = self.stopped_at
        return fields


def schedule_warning(cfg: Any) -> str | None:
    """A line when no validation pass falls between the start and the last step: adapters/best is then the
    untrained start or the last step, and early stopping cannot act. A warning, not a refusal: a short trial
    of a long preset is a fair thing to run, and its last step is still validated."""
    every, steps = cfg.train.eval_every, cfg.train.max_steps
    if not cfg.data.val_size or not every or every < steps:
        return None
    return (f"warning: train.eval_every={every} is not below train.max_steps={steps}: the policy is validated "
            f"only before training and after step {steps}, so adapters/best is one of those two and "
            f"train.patience cannot stop early; for passes in between set train.eval_every={max(1, steps // 4)}")
