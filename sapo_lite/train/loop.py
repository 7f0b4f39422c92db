"""The SAPO training loop, top to bottom; setup lives in `session.py`.

One optimizer step:
    every `ema_every` steps: ema <- lerp(ema, policy)
    every `generate_every` steps (default every step):
        take `gen_per_step` new examples; the EMA rewrites a segment of each good response
        reference log-probs of the new pairs (only for losses that need them), stored with them
        push the pairs into the on-disk FIFO buffer
    `grad_accum` micro-batches sampled from the buffer: policy forward + loss + backward
    clip, optimizer step, LR schedule, log one line, checkpoint every `save_every`

Same as the official code: the EMA is updated at the start of a step, before generation, every
step by default (`ema_every` 1; the paper's text says every two steps: `sapo.ema_every=2`); the
reference refresh, when on, follows the EMA update at the same step numbers.

Departures from the official code:
- the reference is the frozen base (adapters off), not a third model refreshed from the EMA
  every 108 steps (`sapo.ref_refresh_steps=108` restores that); reference log-probs are
  computed once per pair when it enters the buffer, so a training step runs one
  forward+backward per pair.
- `generate_every` N (the official `sample_every_n_steps`): the official loop still draws the
  examples of the steps between generations and discards them; here they wait for the next
  generation, so no example goes unused.
- one process: the official code trains 8 processes of 8 pairs (64 pairs a step); the presets
  train 2 x 4 = 8 pairs a step.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from ..config.schema import Config
from ..data.scoring import held_out_metric
from ..errors import TrainingDiverged
from ..models.generation import evaluate_role
from ..models.roles import EMA, acting_as, ema_update, reference, refresh_reference
from ..run.testhook import pause_point
from ..sapo.augment import CUT_OFF, chosen_only_pairs, pair_ending, self_augment
from ..sapo.buffer import ReplayBuffer
from ..sapo.losses import LOSSES, LossSpec
from ..sapo.pair_logps import pair_logps
from .checkpoint import (
    latest_checkpoint,
    load_adapter_weights,
    load_trainer_state,
    rank_rng_state,
    remove_leftovers,
    restore_rng_state,
    rewind_metrics,
    rng_state,
    save_checkpoint,
)
from .distributed import resume_command
from .finish import save_final_adapters, write_summary
from .held_out import held_out_summary, record_held_out
from .metrics import MetricsWriter, TrainProgress
from .session import TrainSession, peak_memory_gb, setup_session
from .signals import StopRequest


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_before: float | None
    eval_after: float | None
    wall_s: float
    stopped_early: bool = False
    eval_metric: str = "exact match"


def train(cfg: Config, run_dir: Path, console: Console, resume: bool = False) -> TrainResult:
    started = time.perf_counter()
    session = setup_session(cfg, run_dir, console)
    record: dict = {}
    if resume:
        start_step, eval_before, record = _restore(session, run_dir, console)
    else:
        start_step, eval_before = 0, _held_out_score(session, "base", console, run_dir)
    loss_spec = LOSSES[cfg.loss.name]
    procs = session.processes  # one process, or this rank of N (distributed.py)
    buffer = ReplayBuffer(run_dir / procs.buffer_file, cfg.sapo.buffer_size)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=procs.is_main)
    model, device = session.model, session.device
    bad_in_a_row = bad_total = 0
    step = start_step

    def checkpoint(at_step: int) -> None:
        save_checkpoint(
            run_dir, at_step, model, session.optimizer, session.scheduler,
            rng_state(session.data_rng, session.sample_rng), session.stream.position(), buffer,
            keep=cfg.train.keep_checkpoints, eval_before=eval_before, record=record, processes=procs,
        )

    try:
        stopper = procs.agreed_stop(StopRequest())  # every rank stops after the same step
        with stopper as stop, TrainProgress(console, cfg.train.max_steps, start_step) as progress:
            for step in range(start_step + 1, cfg.train.max_steps + 1):
                step_start = time.perf_counter()
                if step > 1 and (step - 1) % cfg.sapo.ema_every == 0:
                    ema_update(model, cfg.sapo.ema_decay)
                refresh = cfg.sapo.ref_refresh_steps
                if loss_spec.needs_reference and refresh and step > 1 and (step - 1) % refresh == 0:
                    refresh_reference(model)
                    buffer.invalidate_reference()

                # Steps between generations (`sapo.generate_every`) train from the buffer alone.
                pairs, gen_s, ref_s = [], 0.0, 0.0
                pair_figures = {"pairs/identical": math.nan, "pairs/cut_off": math.nan, "pairs/added": 0.0}
                if (step - 1) % cfg.sapo.generate_every == 0:
                    pairs, gen_s, ref_s, pair_figures = _add_new_pairs(session, buffer, loss_spec, step)

                # 3. Policy update on pairs drawn from the buffer.
                pause_point("training")
                train_start = time.perf_counter()
                session.optimizer.zero_grad(set_to_none=True)
                totals = _Totals()
                for _ in range(cfg.train.grad_accum):
                    batch = buffer.sample(cfg.train.micro_batch, session.sample_rng)
                    if loss_spec.needs_reference:
                        _fill_missing_reference(session, buffer, batch)
                    logps = session.to_pair_logps(batch, loss_spec.needs_reference)
                    out = loss_spec.fn(logps, cfg.loss.beta)
                    (out.loss.mean() / cfg.train.grad_accum).backward()
                    totals.add(out, logps, batch)
                clip = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(session.trainable, clip).item()
                finite = math.isfinite(grad_norm) and math.isfinite(totals.means()["loss"])
                finite = procs.all(finite)  # skip on every rank or on none
                if finite:
                    session.optimizer.step()
                    session.scheduler.step()
                    bad_in_a_row = 0
                else:  # skip the update: one bad batch must not poison the adapter
                    session.optimizer.zero_grad(set_to_none=True)
                    bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                train_s = time.perf_counter() - train_start

                step_s = time.perf_counter() - step_start
                record = {
                    "step": step,
                    **totals.means(),
                    "lr": session.scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "gen_s": gen_s,
                    "ref_s": ref_s,
                    "train_s": train_s,
                    "step_s": step_s,
                    "gen_share": gen_s / step_s,
                    "tokens_per_s": totals.tokens / train_s,
                    "buffer_size": len(buffer),
                    **pair_figures,
                    "skipped_steps": bad_total,
                    "epoch": session.stream.epoch,
                    "peak_mem_gb": peak_memory_gb(device),
                }
                procs.log_rank_debug(model, run_dir, record)
                record = procs.mean_over_ranks(record)
                metrics.write(record)
                session.reporter.log(record)
                if step % cfg.train.sample_every == 0 and pairs:
                    session.reporter.log_samples(step, session.decode_pairs(pairs))
                progress.update(record)
                if bad_in_a_row >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"loss or gradient was not finite for {bad_in_a_row} steps in a row (last at step {step});"
                        " the adapters were not updated by those steps",
                        f"lower `train.lr` (now {cfg.train.lr:g}) and resume with `sapo-lite train --resume {run_dir}`"
                        " from the last good checkpoint",
                    )
                if stop.requested:
                    break
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                    checkpoint(step)
        if step > start_step:  # a resume that only finishes the run has nothing new to save
            checkpoint(step)
    finally:  # also when training diverges: flush what was logged
        metrics.close()
        session.reporter.close()
        buffer.close()
    if stop.requested:
        console.print(f"stopped after step {step}; resume with: {resume_command(procs.count, run_dir)}")
        return TrainResult(run_dir, step, record.get("loss", math.nan), eval_before, None,
                           time.perf_counter() - started, stopped_early=True)
    if procs.is_main:
        save_final_adapters(model, run_dir)
    pause_point("final-eval")
    eval_after = _held_out_score(session, "policy", console, run_dir)
    result = TrainResult(
        run_dir, step, record.get("loss", math.nan), eval_before, eval_after, time.perf_counter() - started,
        eval_metric=held_out_metric(session.eval_examples),
    )
    if procs.is_main:
        _write_summary(run_dir, result)
    return result


def _add_new_pairs(
    session: TrainSession, buffer: ReplayBuffer, loss_spec: LossSpec, step: int
) -> tuple[list, float, float, dict[str, float]]:
    """Steps 1 and 2: new pairs, their reference log-probs, into the buffer.

    Returns the pairs, the seconds spent generating and on the reference pass, and the figures
    of the new pairs for the metrics (see `_pair_figures`).
    """
    cfg, model = session.cfg, session.model
    pause_point("generation")
    started = time.perf_counter()
    examples = session.stream.take(cfg.sapo.gen_per_step)
    if not loss_spec.needs_rejected:  # SFT: the chosen responses alone, nothing generated
        pairs = chosen_only_pairs(examples)
        figures = {"pairs/identical": math.nan, "pairs/cut_off": math.nan, "pairs/added": float(len(pairs))}
    else:  # the EMA rewrites a segment of each new good response
        sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
        with acting_as(model, EMA):
            new = self_augment(
                model, examples, cfg.sapo.segment_len, cfg.data.max_len, session.pad_id, session.stop_ids,
                session.data_rng, cfg.sapo.gen_batch_size, sampling, cfg.sapo.static_cache,
                short_rewrite=cfg.sapo.short_rewrite, identical=cfg.sapo.identical, buffer_empty=len(buffer) == 0,
            )
        pairs = new.pairs
        figures = _pair_figures(new, len(examples), session.stop_ids)
    gen_s = time.perf_counter() - started

    pause_point("reference")  # reference log-probs once per pair, stored with it in the buffer
    ref_start = time.perf_counter()
    ref_logps = None
    if loss_spec.needs_reference:
        with reference(model):
            ref_c, ref_r, _, _ = pair_logps(model, pairs, session.pad_id, session.device, cfg.train.logps_chunk_tokens)
        ref_logps = list(zip(ref_c.tolist(), ref_r.tolist()))
    ref_s = time.perf_counter() - ref_start
    pause_point("buffer-write")
    buffer.add(pairs, step, ref_logps)
    return pairs, gen_s, ref_s, figures


def _pair_figures(new, examples: int, stop_ids) -> dict[str, float]:
    """pairs/identical: share of first rewrites equal to the chosen response (the EMA has learned it);
    pairs/cut_off: share of the buffered pairs whose rewrite was cut at the length limit (often
    mid-sentence); pairs/added: pairs written to the buffer (fewer than examples when identical ones drop)."""
    cut = sum(pair_ending(p.rejected_ids, p.prompt_len, p.trunc_point, p.segment_len, stop_ids) == CUT_OFF
              for p in new.pairs)
    return {
        "pairs/identical": new.identical / examples,
        "pairs/cut_off": cut / len(new.pairs) if new.pairs else math.nan,
        "pairs/added": float(len(new.pairs)),
    }


class _Totals:
    """Sums over the micro-batches of one optimizer step, reported as means.

    The sums stay on the device until `means()`: one GPU sync per step instead of one per value.
    """

    KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.keys = self.KEYS
        self.count = 0
        self.tokens = 0
        self._means: dict[str, float] | None = None

    def add(self, out, logps, batch) -> None:
        if out.chosen_rewards is None:  # a loss without rejected responses (SFT): loss and chosen log-prob only
            self.keys = ("loss", "logps/chosen")
            values = torch.stack([out.loss.detach().float().sum(), logps.policy_chosen.detach().float().sum()])
        else:
            values = torch.stack([
                out.loss.detach().float().sum(),
                out.chosen_rewards.float().sum(),
                out.rejected_rewards.float().sum(),
                (out.chosen_rewards - out.rejected_rewards).float().sum(),
                (out.chosen_rewards > out.rejected_rewards).float().sum(),
                logps.policy_chosen.detach().float().sum(),
                logps.policy_rejected.detach().float().sum(),
            ])
        self.sums = values if self.sums is None else self.sums + values
        self.count += len(batch)
        self.tokens += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)

    def means(self) -> dict[str, float]:
        if self._means is None:
            self._means = dict(zip(self.keys, (self.sums / self.count).tolist()))
        return self._means


def _fill_missing_reference(session: TrainSession, buffer: ReplayBuffer, batch) -> None:
    """Reference log-probs for drawn pairs whose cache a reference refresh invalidated."""
    missing = list({p.pair_id: p for p in batch if p.ref_logp_chosen is None}.values())
    if not missing:
        return
    with reference(session.model):
        ref_c, ref_r, _, _ = pair_logps(
            session.model, missing, session.pad_id, session.device, session.cfg.train.logps_chunk_tokens
        )
    values = list(zip(ref_c.tolist(), ref_r.tolist()))
    buffer.set_reference(missing, values)
    for pair, (chosen, rejected) in zip(missing, values):
        pair.ref_logp_chosen, pair.ref_logp_rejected = chosen, rejected  # repeated draws share the object


def _restore(session: TrainSession, run_dir: Path, console: Console) -> tuple[int, float | None, dict]:
    """Bring model, optimizer, RNGs, data position, buffer and metrics back to the newest checkpoint."""
    remove_leftovers(run_dir)
    checkpoint = latest_checkpoint(run_dir)
    for path, problem in checkpoint.skipped:
        console.print(f"warning: skipping incomplete checkpoint {path} ({problem})", highlight=False)
    procs = session.processes
    procs.check_resumable(checkpoint.processes, run_dir)
    state = load_trainer_state(checkpoint)
    load_adapter_weights(session.model, checkpoint)
    session.optimizer.load_state_dict(state["optimizer"])
    session.scheduler.load_state_dict(state["scheduler"])
    _apply_new_peak_lr(session)
    restore_rng_state(rank_rng_state(checkpoint, state, procs), session.data_rng, session.sample_rng)
    session.stream.seek(checkpoint.data_position)
    ReplayBuffer.restore(checkpoint.path / procs.buffer_file, run_dir / procs.buffer_file)
    if procs.is_main:
        rewind_metrics(run_dir / "metrics.jsonl", checkpoint.step, checkpoint.record)
    left = "" if checkpoint.step < session.cfg.train.max_steps else " to finish the run (no steps left to train)"
    console.print(f"resuming from {checkpoint.path.name}{left}")
    return checkpoint.step, checkpoint.eval_before, checkpoint.record or {}


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


def _held_out_score(session: TrainSession, role: str, console: Console, run_dir: Path) -> float | None:
    if not session.eval_examples or not session.processes.is_main:
        return None
    score = evaluate_role(
        session.model, session.tokenizer, session.eval_examples, role,
        session.cfg.data.eval_max_new_tokens, session.stop_ids,
    )
    console.print(f"{score.describe()} ({session.eval_source})", highlight=False)
    record_held_out(run_dir, score)
    return score.headline


def _write_summary(run_dir: Path, result: TrainResult) -> None:
    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        # constraint data: overall and per-kind figures; otherwise exact match
        **(held_out_summary(run_dir) or {"eval_exact_match_base": result.eval_before,
                                         "eval_exact_match_policy": result.eval_after}),
        "wall_s": round(result.wall_s, 2),
    }
    write_summary(run_dir, summary)
