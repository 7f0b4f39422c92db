"""The SAPO training loop, top to bottom; setup lives in `session.py`.

One optimizer step:
    every `ema_every` steps: ema <- lerp(ema, policy)
    take `gen_per_step` new examples; the EMA rewrites a segment of each good response
    reference log-probs of the new pairs (only for losses that need them), stored with them
    push the pairs into the on-disk FIFO buffer
    `grad_accum` micro-batches sampled from the buffer: policy forward + loss + backward
    clip, optimizer step, LR schedule, log one line, checkpoint every `save_every`

Departure from the official code: the reference is the frozen base (adapters off), not a
third model refreshed from the EMA, and reference log-probs are computed once per pair
when it enters the buffer, so a training step runs one forward+backward per pair.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from .augment import make_pairs
from .batching import pair_logps
from .buffer import ReplayBuffer
from .checkpoint import rng_state, save_adapters, save_checkpoint
from .config import Config
from .evaluate import exact_match
from .losses import LOSSES
from .metrics import MetricsWriter, TrainProgress
from .model import EMA, ema_update, generating_with, reference
from .session import TrainSession, peak_memory_gb, setup_session


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_before: float | None
    eval_after: float | None
    wall_s: float


def train(cfg: Config, run_dir: Path, console: Console) -> TrainResult:
    started = time.perf_counter()
    session = setup_session(cfg, run_dir, console)
    eval_before = _held_out_score(session, "base", console)
    loss_spec = LOSSES[cfg.loss.name]
    buffer = ReplayBuffer(run_dir / "buffer.sqlite", cfg.sapo.buffer_size)
    metrics = MetricsWriter(run_dir / "metrics.jsonl")
    model, device = session.model, session.device
    sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
    record: dict = {}

    with TrainProgress(console, cfg.train.max_steps) as progress:
        for step in range(1, cfg.train.max_steps + 1):
            step_start = time.perf_counter()
            if step > 1 and (step - 1) % cfg.sapo.ema_every == 0:
                ema_update(model, cfg.sapo.ema_decay)

            # 1. Self-augmentation: the EMA rewrites a segment of each new good response.
            examples = session.stream.take(cfg.sapo.gen_per_step)
            with generating_with(model, EMA):
                pairs = make_pairs(
                    model, examples, cfg.sapo.segment_len, cfg.data.max_len, session.pad_id,
                    session.stop_ids, session.data_rng, cfg.sapo.gen_batch_size, sampling,
                )
            gen_s = time.perf_counter() - step_start
            # Once the EMA reproduces a segment exactly, the pair teaches nothing: worth watching.
            identical = sum(np.array_equal(p.chosen_ids, p.rejected_ids) for p in pairs) / len(pairs)

            # 2. Reference log-probs once per pair, stored with it in the buffer.
            ref_start = time.perf_counter()
            ref_logps = None
            if loss_spec.needs_reference:
                with reference(model):
                    ref_c, ref_r, _, _ = pair_logps(model, pairs, session.pad_id, device)
                ref_logps = list(zip(ref_c.tolist(), ref_r.tolist()))
            buffer.add(pairs, step, ref_logps)
            ref_s = time.perf_counter() - ref_start

            # 3. Policy update on pairs drawn from the buffer.
            train_start = time.perf_counter()
            session.optimizer.zero_grad(set_to_none=True)
            totals = _Totals()
            for _ in range(cfg.train.grad_accum):
                batch = buffer.sample(cfg.train.micro_batch, session.sample_rng)
                logps = session.to_pair_logps(batch, loss_spec.needs_reference)
                out = loss_spec.fn(logps, cfg.loss.beta)
                (out.loss.mean() / cfg.train.grad_accum).backward()
                totals.add(out, logps, batch)
            clip = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(session.trainable, clip).item()
            session.optimizer.step()
            session.scheduler.step()
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
                "pairs/identical": identical,
                "epoch": session.stream.epoch,
                "peak_mem_gb": peak_memory_gb(device),
            }
            metrics.write(record)
            progress.update(record)
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < cfg.train.max_steps:
                _checkpoint(session, run_dir, step, buffer)

    _checkpoint(session, run_dir, cfg.train.max_steps, buffer)
    save_adapters(model, run_dir / "adapters")
    metrics.close()
    buffer.close()
    eval_after = _held_out_score(session, "policy", console)
    result = TrainResult(
        run_dir, cfg.train.max_steps, record.get("loss", float("nan")), eval_before, eval_after,
        time.perf_counter() - started,
    )
    _write_summary(run_dir, result)
    return result


class _Totals:
    """Sums over the micro-batches of one optimizer step, reported as means."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0

    def add(self, out, logps, batch) -> None:
        values = {
            "loss": out.loss,
            "rewards/chosen": out.chosen_rewards,
            "rewards/rejected": out.rejected_rewards,
            "rewards/margins": out.chosen_rewards - out.rejected_rewards,
            "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
            "logps/chosen": logps.policy_chosen,
            "logps/rejected": logps.policy_rejected,
        }
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach().float().sum().item()
        self.count += len(batch)
        self.tokens += sum(len(p.chosen_ids) + len(p.rejected_ids) for p in batch)

    def means(self) -> dict[str, float]:
        return {key: value / self.count for key, value in self.sums.items()}


def _checkpoint(session: TrainSession, run_dir: Path, step: int, buffer: ReplayBuffer) -> None:
    save_checkpoint(
        run_dir, step, session.model, session.optimizer, session.scheduler,
        rng_state(session.data_rng, session.sample_rng), session.stream.position(), buffer.last_id(),
        keep=session.cfg.train.keep_checkpoints,
    )


def _held_out_score(session: TrainSession, role: str, console: Console) -> float | None:
    if not session.eval_examples:
        return None
    score = exact_match(
        session.model, session.tokenizer, session.eval_examples, role,
        session.cfg.data.eval_max_new_tokens, session.stop_ids,
    )
    label = "base (adapters off)" if role == "base" else "trained policy"
    console.print(f"held-out exact match, {label}: [bold]{score:.1%}[/] of {len(session.eval_examples)}")
    return score


def _write_summary(run_dir: Path, result: TrainResult) -> None:
    summary = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "eval_exact_match_base": result.eval_before,
        "eval_exact_match_policy": result.eval_after,
        "wall_s": round(result.wall_s, 2),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
