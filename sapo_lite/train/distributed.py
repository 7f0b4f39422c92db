"""Data-parallel SAPO over the processes that `accelerate launch` or `torchrun` start.

Owns everything that differs between one process and N: the process group (accelerate's
`PartialState`: NCCL on GPUs, gloo on CPU), each process's device, the DDP wrapper the
training forward runs through (DDP averages the policy gradients; nothing here sums
gradients by hand), each rank's share of the new examples, its seeds and its buffer file,
and the few collectives that keep the ranks in step: metrics averaged over ranks, rank 0's
validation figures sent to all, and agreement on skipping a bad step and on stopping.

As in the official code (8 processes, one replay buffer each), every process generates its
own share of the new pairs with its copy of the EMA, computes their reference log-probs and
keeps them in its own buffer, and draws its micro-batches from it. Policy gradients are
averaged, so the policy, its optimizer state and hence the EMA stay identical on every rank.

Without a launcher (`WORLD_SIZE` unset or 1) `SINGLE` stands in: every method is a no-op and
every file name is the one-process name, so a one-process run is exactly what it was.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import itertools
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import RunDirError
from ..run.layout import RunDir
from ..sapo.logps import response_token_logps

# Figures that are the same on every rank (kept as they are) or that are not averaged.
SAME_ON_EVERY_RANK = {"step", "lr", "grad_norm", "epoch", "skipped_steps"}
SUMMED = {"tokens_per_s"}  # the job's throughput is the sum of the ranks'
MAXED = {"peak_mem_gb"}  # per GPU: the fullest card is the one that must fit


@dataclass(frozen=True)
class Processes:
    """This process's place in the job: rank `rank` of `count`."""

    rank: int = 0
    count: int = 1
    device_override: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        from ..models.roles import pick_device

        return self.device_override or pick_device()

    @property
    def buffer_file(self) -> str:
        """`buffer.sqlite` for one process (as always), `buffer-rankK.sqlite` for each of N."""
        return RunDir.buffer_name(self.rank, self.count)

    @property
    def rng_file(self) -> str:
        return f"rng-rank{self.rank}.pt"

    def reseed_rank(self, seed: int) -> None:
        """Give ranks > 0 their own torch/python/numpy streams (sampling, dropout) once the adapters
        exist: they must start identical, so the seed that initialised them is the same everywhere."""
        if self.rank:
            import random

            import numpy as np

            torch.manual_seed(seed + 7919 * self.rank)
            random.seed(seed + 7919 * self.rank)
            np.random.seed(seed + 7919 * self.rank)

    # ------------------------------------------------------------ collectives

    def barrier(self) -> None:
        if self.count > 1:
            torch.distributed.barrier()

    def _all_reduce(self, values: list[float], op: Any) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=op)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one."""
        if self.count == 1:
            return flag
        return self._all_reduce([float(flag)], torch.distributed.ReduceOp.MAX)[0] > 0

    def all(self, flag: bool) -> bool:
        """True on every rank only when it is True on all (a step is skipped everywhere or nowhere)."""
        return not self.any(not flag)

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (what rank 0 alone computed, e.g. the validation figures)."""
        if self.count == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def mean_over_ranks(self, record: dict[str, Any]) -> dict[str, Any]:
        """A step's figures over all ranks: means (every rank trains the same number of pairs, so a
        mean of rank means is the mean over all pairs), tokens/s summed, peak memory the largest."""
        if self.count == 1:
            return record
        keys = [k for k, v in record.items()
                if k not in SAME_ON_EVERY_RANK and isinstance(v, (int, float)) and not isinstance(v, bool)]
        summed = self._all_reduce([float(record[k]) for k in keys], torch.distributed.ReduceOp.SUM)
        largest = self._all_reduce([float(record[k]) for k in keys], torch.distributed.ReduceOp.MAX)
        out = dict(record)
        for key, total, top in zip(keys, summed, largest):
            out[key] = total if key in SUMMED else top if key in MAXED else total / self.count
        return out

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block, then the others (e.g. building a shared folder once). If rank 0
        fails, the launcher stops the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def agreed_stop(self, stop: Any) -> Any:
        """Wrap a StopRequest so every rank stops after the same step (signals reach ranks at different times)."""
        return stop if self.count == 1 else _AgreedStop(stop, self)

    # ------------------------------------------------------------ the trained forward

    def data_parallel(self, model: Any, micro_batches_per_step: int) -> Callable[..., Any]:
        """`response_token_logps`, run through DDP when there are several processes.

        DDP averages gradients only when its own forward ran, so the training forward (decoder
        body + chunked head) is a small module DDP wraps. Gradients are averaged on the last
        micro-batch of a step only, what `DDP.no_sync()` does for the others.
        """
        if self.count == 1:
            return response_token_logps
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(
            _TrainedForward(model),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False,  # the base's buffers (rotary tables) are equal everywhere
            # No start-up broadcast: the adapters are identical by seed (tests check it), and a
            # broadcast would send the whole 4-bit base from rank 0 to every card.
            init_sync=False,
        )
        calls = itertools.count()

        def score(_model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  response_mask: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
            wrapped.require_backward_grad_sync = next(calls) % micro_batches_per_step == micro_batches_per_step - 1
            return wrapped(input_ids, attention_mask, response_mask, chunk_tokens)

        return score

    def describe(self, micro_batch: int, grad_accum: int, gen_per_step: int) -> str:
        return (f"{self.count} processes: {gen_per_step * self.count} new pairs/step ({gen_per_step} each), "
                f"effective batch {micro_batch * grad_accum * self.count} pairs/step "
                f"({micro_batch} x {grad_accum} accumulation x {self.count} processes), one buffer each")

    # ------------------------------------------------------------ checks

    def check_resumable(self, checkpoint_processes: int, run_dir: Path) -> None:
        if checkpoint_processes != self.count:
            raise RunDirError(
                f"`{run_dir}` was trained with {checkpoint_processes} process(es); this resume runs {self.count}",
                _resume_command(checkpoint_processes, run_dir),
            )

    def log_rank_debug(self, model: Any, run_dir: Path, record: dict[str, Any]) -> None:
        """With SAPO_DEBUG_ADAPTER_SUMS=1, each rank appends the SHA-256 of its policy and EMA adapters
        after every step, and its own loss, to RUN/debug/adapter-sums-rankK.jsonl (tests read it)."""
        if os.environ.get("SAPO_DEBUG_ADAPTER_SUMS") != "1":
            return
        from ..models.roles import EMA, POLICY, adapter_tensors

        sums = {"step": record["step"], "loss": record["loss"]}
        for role in (POLICY, EMA):
            digest = hashlib.sha256()
            for name, tensor in sorted(adapter_tensors(model, role).items()):
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
            sums[role] = digest.hexdigest()
        folder = RunDir(run_dir).debug
        folder.mkdir(exist_ok=True)
        with (folder / f"adapter-sums-rank{self.rank}.jsonl").open("a") as handle:
            handle.write(json.dumps(sums) + "\n")


SINGLE = Processes()


def resume_command(count: int, run_dir: Path) -> str:
    if count == 1:
        return f"sapo-lite train --resume {run_dir}"
    return f"accelerate launch --num_processes {count} -m sapo_lite train --resume {run_dir}"


def _resume_command(count: int, run_dir: Path) -> str:
    return f"resume it with {'one process' if count == 1 else count}: {resume_command(count, run_dir)}"


def start_processes() -> Processes:
    """Join the launcher's process group (once; later calls return the same), or SINGLE without one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    from accelerate import PartialState

    _die_with_launcher()
    state = PartialState(cpu=not torch.cuda.is_available())
    if not state.initialized or state.num_processes <= 1:
        return SINGLE
    if not getattr(start_processes, "_cleanup", False):
        atexit.register(state.destroy_process_group)
        start_processes._cleanup = True  # type: ignore[attr-defined]
    device = state.device if state.device.type == "cuda" else torch.device("cpu")
    return Processes(state.process_index, state.num_processes, device)


def _die_with_launcher() -> None:
    """Have the kernel kill this worker when its launcher dies (SIGKILL, the OOM killer).

    torchrun, which `accelerate launch` runs, starts each worker in a session of its own, so a
    signal that kills the launcher never reaches the workers: they would train on without it,
    into a run directory the user believes stopped. Ctrl-C and SIGTERM are different: the
    launcher forwards them and every rank stops after the same step.
    """
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL))


class _TrainedForward(torch.nn.Module):
    """The training forward as a module of its own, so DDP can wrap it."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                chunk_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        return response_token_logps(self.model, input_ids, attention_mask, response_mask, chunk_tokens)


class _AgreedStop:
    """A StopRequest whose `requested` is True on every rank once it is True on one.

    Reading `requested` is a collective: the loop reads it at the same point on every rank.
    """

    def __init__(self, stop: Any, processes: Processes) -> None:
        self._stop, self._processes, self._agreed = stop, processes, False

    def __enter__(self) -> _AgreedStop:
        self._stop.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.__exit__(*exc)

    @property
    def requested(self) -> bool:
        self._agreed = self._agreed or self._processes.any(self._stop.requested)
        return self._agreed


class RankShare:
    """Each rank's share of a DataStream: every rank walks the same seeded order and keeps its
    own slice of each take, so the data position is one number for the whole job."""

    def __init__(self, stream: Any, processes: Processes) -> None:
        self.stream, self.processes = stream, processes

    def take(self, n: int) -> list[Any]:
        taken = self.stream.take(n * self.processes.count)
        return taken[self.processes.rank * n : (self.processes.rank + 1) * n]

    def position(self) -> dict[str, int]:
        return self.stream.position()

    def seek(self, position: dict[str, int]) -> None:
        self.stream.seek(position)

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    @property
    def examples(self) -> Any:
        return self.stream.examples


def share_stream(stream: Any, processes: Processes) -> Any:
    return stream if processes.count == 1 else RankShare(stream, processes)
