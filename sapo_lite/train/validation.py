"""The validation split, watched during training, and the best step it picks.

`data.val_size` examples are carved out of the training data (its own random stream, never the
held-out evaluation set, never trained on). Before the first step the EMA, which is then the
starting policy, rewrites each of them once, as training would: these validation pairs, with
their reference log-probs, are stored in RUN/validation.sqlite, so a resumed run scores the
very same pairs. Every `train.eval_every` steps (and before the first) the policy is scored:

- val/nll: mean over examples of the chosen response's NLL per token;
- val/accuracy, val/margin: on the validation pairs, the implicit reward margin
  (pi_c - ref_c) - (pi_r - ref_r) of summed response log-probs, against the run's reference (the
  base, or `model.init_adapter`): its mean, and the share of pairs where it is positive. The same
  measure for every loss, so SFT and SAPO runs are compared on one scale;
- val/accuracy/data, val/margin/data: the same on the data's own pairs of the validation examples, when the
  run reads them (`sapo.pairs` data or mix; stored beside the rewrites): real pairs against self-made ones;
- val/constraints: with greedy answers (`data.eval_max_new_tokens`), the share of the
  constraints met, where the rows carry constraints.

Validation never draws from the training streams (its generation runs under a forked torch RNG
seeded from its own stream, and scoring is greedy), so a run scores the same with or without a
kill between two passes. The best step by `train.best_metric` is kept as RUN/adapters/best (the
policy adapter, PEFT format, published atomically, with best.json naming the step and figure);
`train.patience` stops the run after that many passes without a new best.
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.examples import Example
from ..data.streams import random_stream
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
    chosen = set(random_stream(seed, "validation").permutation(len(examples))[:size].tolist())
    return ([e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen])


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
    """The validation examples, their fixed pairs, and a scorer for the policy."""

    def __init__(self, session: Any, examples: list[Example]) -> None:
        self.session = session
        self.examples = examples
        self.pairs = self._pairs()
        self.has_constraints = any(ex.constraints for ex in examples)

    def _pairs(self) -> list[StoredPair]:
        """The validation pairs: made once by the starting EMA and stored, read back on resume."""
        session, cfg = self.session, self.session.cfg
        path = RunDir(session.run_dir) / "validation.sqlite"
        if not session.processes.is_main:
            path = path.with_name(f"validation-rank{session.processes.rank}.sqlite")
        with_data = reads_rejected(cfg)
        count = len(self.examples) * (2 if with_data else 1)
        store = ReplayBuffer(path, capacity=max(1, count))
        try:
            if len(store) != count:
                store.close()
                path.unlink(missing_ok=True)
                store = ReplayBuffer(path, capacity=count)
                sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
                rng = random_stream(cfg.train.seed, "validation", 1)
                with torch.random.fork_rng(devices=[]), acting_as(session.model, EMA), session.generating():
                    torch.manual_seed(int(rng.integers(2**31)))
                    new = self_augment(
                        session.model, self.examples, cfg.sapo.segment_len, cfg.data.max_len, session.pad_id,
                        session.stop_ids, rng, cfg.sapo.gen_batch_size, sampling, short_rewrite=cfg.sapo.short_rewrite,
                    )
                pairs = new.pairs + (data_pairs(self.examples) if with_data else [])
                store.add(pairs, 0, self._reference_logps(pairs))
            return store.all_pairs()
        finally:
            store.close()

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
        nll, margins = [], []
        rewrites = [p for p in self.pairs if p.origin != FROM_DATA]  # the data's pairs repeat the chosen responses
        real = [p for p in self.pairs if p.origin == FROM_DATA]
        with acting_as(self.session.model, POLICY):
            for batch in _batches(rewrites + real, self.session.cfg.train.micro_batch):
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
            s = self.session
            with s.generating():
                score = evaluate_role(s.model, s.tokenizer, self.examples, POLICY, s.cfg.data.eval_max_new_tokens,
                                      s.stop_ids)
            figures["val/constraints"] = score.constraints.rate
        figures["val_s"] = time.perf_counter() - started
        return figures


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
    """What the loop calls: the passes on schedule, the best step, early stopping; a no-op without a split."""

    def __init__(self, session: Any, loop_state: dict[str, Any]) -> None:
        cfg = session.cfg
        self.session, self.every, self.patience = session, cfg.train.eval_every, cfg.train.patience
        self.validation = Validation(session, session.val_examples) if session.val_examples else None
        metric = best_metric_name(cfg.train.best_metric, session.val_examples) if self.validation else ""
        self.best = BestStep(**loop_state["best"]) if loop_state.get("best") else BestStep(metric)
        self.stopped_at: int | None = loop_state.get("patience_stop")

    @property
    def on(self) -> bool:
        return self.validation is not None

    def before_training(self) -> dict[str, Any] | None:
        """The pass before the first step (step 0): where the best step starts from. None when off."""
        return self._pass(0) if self.on else None

    def after_step(self, step: int, record: dict[str, Any]) -> None:
        """On a validation step: score, add the figures to the step's record, keep a new best."""
        if self.on and step % self.every == 0:
            record.update(self._pass(step))

    def _pass(self, step: int) -> dict[str, Any]:
        figures = self.validation.score()
        if self.best.update(step, figures[self.best.metric]) and self.session.processes.is_main:
            save_best_adapter(self.session.model, self.session.run_dir, self.best)
        if self.patience and self.best.passes_since >= self.patience and self.stopped_at is None:
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
