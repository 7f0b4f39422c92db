"""The SAPO training loop, top to bottom; setup lives in `session.py`.

One optimizer step:
    every `ema_every` steps: ema <- lerp(ema, policy)
    every `generate_every` steps (default every step):
        take `gen_per_step` new examples; the pair source (`sapo.pairs`, sapo/sources/) makes their
        rejected responses: by default the EMA rewrites a segment of each good response
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from ..config.schema import Config
from ..data.scoring import held_out_metric
from ..errors import TrainingDiverged
from ..models.generation import evaluate_role
from ..models.roles import ema_update, reference, refresh_reference, training_mode
from ..run.layout import RunDir
from ..run.testhook import pause_point
from ..sapo.buffer import ReplayBuffer
from ..sapo.losses import LOSSES, LossSpec
from ..sapo.pair_logps import pair_logps
from ..sapo.sources import PairSource, SourceContext, pair_source
from .checkpoint import rng_state, save_checkpoint
from .distributed import resume_command
from .finish import save_final_adapters, write_summary
from .held_out import held_out_summary, is_free_form, record_held_out, record_nll, reference_nll
from .metrics import MetricsWriter, StepTotals, TrainProgress
from .resume import restore
from .session import TrainSession, peak_memory_gb, setup_session
from .signals import StopRequest
from .validation import ValidationWatch


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
    session = setup_session(cfg, run_dir, console, resume=resume)
    record: dict = {}
    loop_state: dict = {}
    if resume:
        restored = restore(session, run_dir, console)
        start_step, eval_before, record, loop_state = (restored.step, restored.eval_before, restored.record or {},
                                                       restored.loop_state)
    else:
        start_step, eval_before = 0, _held_out_score(session, "base", console, run_dir)
    skips = SkippedSteps(**loop_state.get("skipped", {}))
    earlier_s = loop_state.get("wall_s", 0.0)  # the time of the parts before a resume
    watch = ValidationWatch(session, loop_state, console)  # the validation split, best step, early stopping
    loss_spec = LOSSES[cfg.loss.name]
    source = pair_source(cfg)  # where the rejected responses come from (`sapo.pairs`)
    session.split_origins = source.origins
    procs = session.processes  # one process, or this rank of N (distributed.py)
    buffer = ReplayBuffer(run_dir / procs.buffer_file, cfg.sapo.buffer_size, session.stop_ids)
    metrics = MetricsWriter(RunDir(run_dir).metrics, enabled=procs.is_main)
    if not resume and (before := watch.before_training()) is not None:
        metrics.write({"step": 0, **before})  # where the best step starts from
        console.print(_validation_line(before, watch), highlight=False)
    step = start_step
    last_step = start_step if watch.should_stop else cfg.train.max_steps  # an early-stopped run only finishes

    def checkpoint(at_step: int) -> None:
        save_checkpoint(
            run_dir, at_step, session.model, session.optimizer, session.scheduler,
            rng_state(session.data_rng, session.sample_rng), session.stream.position(), buffer,
            keep=cfg.train.keep_checkpoints, eval_before=eval_before, record=record, processes=procs,
            loop_state={"skipped": vars(skips), **watch.state(), "wall_s": earlier_s + time.perf_counter() - started},
            best_adapter=watch.best_adapter,
        )

    try:
        stopper = procs.agreed_stop(StopRequest())  # every rank stops after the same step
        with stopper as stop, TrainProgress(console, cfg.train.max_steps, start_step) as progress:
            for step in range(start_step + 1, last_step + 1):
                step_start = time.perf_counter()
                _update_generator_and_reference(session, buffer, loss_spec, step)
                source.at_step_start(session.model, buffer, step)
                new = NewPairsOfStep()  # steps between generations (`sapo.generate_every`) train from the buffer alone
                if (step - 1) % cfg.sapo.generate_every == 0:
                    new = _add_new_pairs(session, buffer, loss_spec, source, step)
                update = _policy_update(session, buffer, loss_spec)
                skips.count(update.applied)
                record = _step_record(session, buffer, step, new, update, skips.total, time.perf_counter() - step_start)
                watch.after_step(step, record)
                metrics.write(record)
                session.reporter.log(record)
                if step % cfg.train.sample_every == 0 and new.pairs:
                    session.reporter.log_samples(step, session.decode_pairs(new.pairs))
                progress.update(record)
                if skips.in_a_row >= cfg.train.max_bad_steps:
                    raise TrainingDiverged(
                        f"loss or gradient was not finite for {skips.in_a_row} steps in a row (last at step {step});"
                        " the adapters were not updated by those steps",
                        f"lower `train.lr` (now {cfg.train.lr:g}) and resume with `sapo-lite train --resume {run_dir}`"
                        " from the last good checkpoint",
                    )
                if stop.requested or watch.should_stop:
                    break
                if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                    checkpoint(step)
        if step > start_step:  # a resume that only finishes the run has nothing new to save
            checkpoint(step)
    finally:  # also when training diverges: flush what was logged
        metrics.close()
        session.reporter.close()
        buffer.close()
    if watch.should_stop:
        console.print(f"early stop after step {watch.stopped_at}: {cfg.train.patience} validation passes without a "
                      f"better {watch.best.metric} than step {watch.best.step}'s", highlight=False)
    if stop.requested:
        console.print(f"stopped after step {step}; resume with: {resume_command(procs.count, run_dir)}")
        return TrainResult(run_dir, step, record.get("loss", math.nan), eval_before, None,
                           time.perf_counter() - started, stopped_early=True)
    if procs.is_main:
        save_final_adapters(session.model, run_dir)
    pause_point("final-eval")
    eval_after = _held_out_score(session, "policy", console, run_dir)
    result = TrainResult(
        run_dir, step, record.get("loss", math.nan), eval_before, eval_after, time.perf_counter() - started,
        eval_metric=held_out_metric(session.eval_examples),
    )
    if procs.is_main:
        _write_summary(run_dir, result, watch.summary(), earlier_s)
    return result


@dataclass
class SkippedSteps:
    """Updates skipped for a non-finite loss or gradient: in a row (the `max_bad_steps` abort) and in all
    (`skipped_steps` in the metrics). Saved in every checkpoint, so a resumed run counts on as if it never stopped."""

    in_a_row: int = 0
    total: int = 0

    def count(self, applied: bool) -> None:
        self.in_a_row = 0 if applied else self.in_a_row + 1
        self.total += not applied


@dataclass
class NewPairsOfStep:
    """What step 1-2 of a step produced: its pairs, their figures, and the seconds they took."""

    pairs: list = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=lambda: {
        "pairs/identical": math.nan, "pairs/cut_off": math.nan, "pairs/added": 0.0})
    gen_s: float = 0.0
    ref_s: float = 0.0


@dataclass
class PolicyUpdate:
    """Step 3: the micro-batches' figures, the gradient norm, and whether the optimizer stepped."""

    totals: StepTotals
    grad_norm: float
    applied: bool
    train_s: float


def _update_generator_and_reference(session: TrainSession, buffer: ReplayBuffer, loss_spec: LossSpec,
                                    step: int) -> None:
    """At the start of a step, before generation: ema <- lerp(ema, policy), and the optional reference refresh."""
    cfg = session.cfg
    if step > 1 and (step - 1) % cfg.sapo.ema_every == 0:
        ema_update(session.model, cfg.sapo.ema_decay)
    refresh = cfg.sapo.ref_refresh_steps
    if loss_spec.needs_reference and refresh and step > 1 and (step - 1) % refresh == 0:
        refresh_reference(session.model)
        buffer.invalidate_reference()


def _add_new_pairs(session: TrainSession, buffer: ReplayBuffer, loss_spec: LossSpec, source: PairSource,
                   step: int) -> NewPairsOfStep:
    """Steps 1 and 2: new pairs from the run's pair source, their reference log-probs, into the buffer."""
    cfg, model = session.cfg, session.model
    pause_point("generation")
    started = time.perf_counter()
    examples = session.stream.take(cfg.sapo.gen_per_step)
    context = SourceContext(model, cfg, session.pad_id, session.stop_ids, session.data_rng, session.generating,
                            session.merged_ema, buffer_empty=len(buffer) == 0)
    made = source.make(context, examples)
    pairs = made.pairs
    # pairs/identical: share of the step's first rewrites equal to the chosen response (the EMA has learned it);
    # pairs/added: pairs written to the buffer (fewer than examples when identical ones drop). pairs/cut_off,
    # the share of the buffer's pairs whose rewrite was cut at the length limit, is counted once they are in it.
    figures = {"pairs/identical": math.nan, "pairs/cut_off": math.nan, **made.figures,
               "pairs/added": float(len(pairs))}
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
    if loss_spec.needs_rejected:  # of the whole buffer after this step's additions, as `buffer --stats` counts it
        figures["pairs/cut_off"] = buffer.cut_off_share()
    return NewPairsOfStep(pairs, figures, gen_s, ref_s)


def _policy_update(session: TrainSession, buffer: ReplayBuffer, loss_spec: LossSpec) -> PolicyUpdate:
    """Step 3: `grad_accum` micro-batches drawn from the buffer, then one clipped optimizer step.

    A non-finite loss or gradient skips the update on every rank: one bad batch must not poison the adapter.
    """
    cfg = session.cfg
    pause_point("training")
    started = time.perf_counter()
    training_mode(session.model)
    session.optimizer.zero_grad(set_to_none=True)
    totals = StepTotals(session.split_origins)  # figures per origin of the drawn pairs, for a source mixing them
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
    applied = session.processes.all(finite)  # skip on every rank or on none
    if applied:
        session.optimizer.step()
        session.scheduler.step()
    else:
        session.optimizer.zero_grad(set_to_none=True)
    return PolicyUpdate(totals, grad_norm, applied, time.perf_counter() - started)


def _step_record(session: TrainSession, buffer: ReplayBuffer, step: int, new: NewPairsOfStep,
                 update: PolicyUpdate, skipped_steps: int, step_s: float) -> dict:
    """The metrics.jsonl line of a step, averaged over ranks (each rank's own figures go to the debug log)."""
    record = {
        "step": step,
        **update.totals.means(),
        "lr": session.scheduler.get_last_lr()[0],
        "grad_norm": update.grad_norm,
        "gen_s": new.gen_s,
        "ref_s": new.ref_s,
        "train_s": update.train_s,
        "step_s": step_s,
        "gen_share": new.gen_s / step_s,
        "tokens_per_s": update.totals.tokens / update.train_s,
        "buffer_size": len(buffer),
        **new.figures,
        "skipped_steps": skipped_steps,
        "epoch": session.stream.epoch,
        "peak_mem_gb": peak_memory_gb(session.device),
    }
    session.processes.log_rank_debug(session.model, session.run_dir, record)
    return session.processes.mean_over_ranks(record)


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


def _held_out_score(session: TrainSession, role: str, console: Console, run_dir: Path) -> float | None:
    if not session.eval_examples or not session.processes.is_main:
        return None
    with session.generating():
        score = evaluate_role(
            session.model, session.tokenizer, session.eval_examples, role,
            session.cfg.data.eval_max_new_tokens, session.stop_ids, decoder=session.cfg.sapo.decoder,
            static_cache=session.cfg.sapo.static_cache,
        )
    console.print(f"{score.describe()} ({session.eval_source})", highlight=False)
    record_held_out(run_dir, score)
    if is_free_form(session.eval_examples):  # exact match alone says little on free-form answers
        nll = reference_nll(session.model, session.eval_examples, role, session.pad_id, session.cfg.train.micro_batch,
                            session.cfg.train.logps_chunk_tokens)
        console.print(f"held-out NLL of the reference responses, {role}: {nll:.3f} per token (lower is better; "
                      "what free-form data without constraints or answers can be scored by)", highlight=False)
        record_nll(run_dir, role, nll)
    return score.headline


def _validation_line(figures: dict, watch: ValidationWatch) -> str:
    shown = " ".join(f"{k.removeprefix('val/')} {v:.3f}" for k, v in figures.items() if k.startswith("val/")
                     and k != "val/best_step")
    return f"validation ({watch.size} examples) before training: {shown}"


def _write_summary(run_dir: Path, result: TrainResult, validation: dict, earlier_s: float) -> None:
    held = held_out_summary(run_dir)  # constraint data: overall and per-kind figures; free-form data: NLL too
    constraints = any(key.startswith("eval_constraints") for key in held)
    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        **({} if constraints else {"eval_exact_match_base": result.eval_before,
                                   "eval_exact_match_policy": result.eval_after}),
        **held,
        **validation,
        **recommended_adapter(run_dir, validation),
        # the whole run's time: the parts before a resume (up to the checkpoint it resumed from), plus this one
        "wall_s": round(earlier_s + result.wall_s, 2),
        **({"wall_s_since_resume": round(result.wall_s, 2)} if earlier_s else {}),
    }
    write_summary(run_dir, summary)


def recommended_adapter(run_dir: Path, validation: dict) -> dict[str, str]:
    """The adapter a user most likely wants: the best validation step's where a validation split chose one."""
    if validation.get("best_step") is not None and (RunDir(run_dir).adapter("best") / "adapter_config.json").is_file():
        return {"adapter": "best", "adapter_note": f"the policy of step {validation['best_step']}, the best by "
                f"{validation['best_metric']} on the validation split (RUN/adapters/best, --adapter best)"}
    return {"adapter": "policy", "adapter_note": "the last step's policy (RUN/adapters/policy): no validation split "
            "chose another"}
