"""Resume: bring model, optimizer, RNGs, data position, buffer and metrics back to the newest checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console

from ..run.layout import RunDir
from ..sapo.buffer import ReplayBuffer
from .checkpoint import (
    CheckpointInfo,
    latest_checkpoint,
    load_adapter_weights,
    load_trainer_state,
    rank_rng_state,
    remove_run_leftovers,
    restore_best_adapter,
    restore_rng_state,
    rewind_metrics,
)
from .session import TrainSession


def restore(session: TrainSession, run_dir: Path, console: Console) -> CheckpointInfo:
    """Bring model, optimizer, RNGs, data position, buffer and metrics back to the newest checkpoint."""
    procs = session.processes
    with procs.main_first():  # rank 0 clears what a killed writer left; two ranks deleting it would race
        if procs.is_main:
            remove_run_leftovers(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    for path, problem in checkpoint.skipped:
        console.print(f"warning: skipping incomplete checkpoint {path} ({problem})", highlight=False)
    procs.check_resumable(checkpoint.processes, run_dir)
    state = load_trainer_state(checkpoint)
    load_adapter_weights(session.model, checkpoint)
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    _apply_new_peak_lr(session)
    restore_rng_state(rank_rng_state(checkpoint, state, procs), session.data_rng, session.sample_rng)
    session.stream.seek(checkpoint.data_position)
    restore_best_adapter(checkpoint, run_dir, procs.is_main)
    ReplayBuffer.restore(checkpoint.path / procs.buffer_file, run_dir / procs.buffer_file)
    if procs.is_main:
        rewind_metrics(RunDir(run_dir).metrics, checkpoint.step, checkpoint.record)
    left = "" if checkpoint.step < session.cfg.train.max_steps else " to finish the run (no steps left to train)"
    console.print(f"resuming from {checkpoint.path.name}{left}")
    return checkpoint


def _apply_new_peak_lr(session: TrainSession) -> None:
    """A resume with a new `train.lr` rescales the schedule from the current step on."""
    scheduler, lr = session.scheduler, session.cfg.train.lr
    if all(math.isclose(base, lr) for base in scheduler.base_lrs):
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(session.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in session.optimizer.param_groups]
