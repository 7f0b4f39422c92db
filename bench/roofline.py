"""What this machine could do at best: memory bandwidth, matmul throughput, and a model's bytes and FLOPs.

Decoding a token for a batch reads every weight once: at batch B its ceiling is bandwidth / (bytes of
weights a step) * B tokens/s. Prefill is matmul-bound: its ceiling is matmul FLOP/s / (2 x the
multiply-adds of the decoder layers' linear layers a token). The machine is shared, so bandwidth and
FLOP/s are probed between rounds (each probe the best of 3 trials): a share is of what the probes during
its own rounds saw (median), a ratio of two things measured under the same load; the summary also gives
the share of the best bandwidth seen anywhere in the run, which a single fast probe can set.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
from torch import nn

from sapo_lite.models.matmul import matmul_t

GB = 1e9


class Ceilings:
    """Bandwidth (a 512 MiB copy and sum, timed) and fp32 matmul throughput (2048^3), best seen."""

    def __init__(self, reps: int = 5) -> None:
        self.copy_gb_s: list[float] = []
        self.read_gb_s: list[float] = []
        self.gflop_s: list[float] = []
        self._source = torch.ones(2**27)  # 512 MiB, written first, so no page is the shared zero page
        self._target = torch.ones(2**27)
        self._a, self._b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        for _ in range(reps):
            self.probe()

    def probe(self, trials: int = 3) -> None:
        """One figure each: the best of `trials` back-to-back timings (as STREAM reports), so that a probe
        that happened to be preempted does not lower the ceiling of its rounds."""
        self.copy_gb_s.append(2 * self._source.numel() * 4 / self._best_of(trials, self._copy) / GB)
        self.read_gb_s.append(self._source.numel() * 4 / self._best_of(trials, self._source.sum) / GB)
        start = time.perf_counter()
        matmul_t(self._a, self._b)  # the route the lean loop's matmuls take (oneDNN where usable)
        self.gflop_s.append(2 * 2048**3 / (time.perf_counter() - start) / GB)

    def _copy(self) -> None:
        self._target.copy_(self._source)

    @staticmethod
    def _best_of(trials: int, work) -> float:
        best = float("inf")
        for _ in range(trials):
            start = time.perf_counter()
            work()
            best = min(best, time.perf_counter() - start)
        return best

    def during(self, first: int) -> tuple[float, float]:
        """Median bandwidth (bytes/s; the better of each probe's copy and read) and FLOP/s of probes `first`..."""
        bandwidth = [max(c, r) for c, r in zip(self.copy_gb_s[first:], self.read_gb_s[first:])]
        return statistics.median(bandwidth) * GB, statistics.median(self.gflop_s[first:]) * GB

    def round_bandwidth(self, index: int) -> float:
        """Bytes/s of probe `index` (the better of its copy and read)."""
        return max(self.copy_gb_s[index], self.read_gb_s[index]) * GB

    @property
    def bandwidth(self) -> float:
        """Best bytes/s seen (copy or read)."""
        return max(self.copy_gb_s + self.read_gb_s) * GB

    @property
    def flops(self) -> float:
        return max(self.gflop_s) * GB

    def describe(self) -> str:
        def spread(values: list[float]) -> str:
            return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"
        return (f"memory bandwidth: copy {spread(self.copy_gb_s)} GB/s, read {spread(self.read_gb_s)} GB/s; "
                f"fp32 matmul (2048^3): {spread(self.gflop_s)} GFLOP/s; best seen {self.bandwidth / GB:.1f} GB/s, "
                f"{self.flops / GB:.0f} GFLOP/s ({len(self.gflop_s)} probes)")

    def release(self) -> None:
        del self._source, self._target
        gc.collect()


def weight_bytes(model: nn.Module, adapter: str | None) -> int:
    """Bytes of weights one decode step reads: every layer weight and the output head once (a tied
    embedding once, as the head; an untied embedding table not at all: a step reads B rows of it), NF4
    data with its quantisation constants, plus the LoRA tensors of `adapter` (None: merged, none read)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = lm.get_input_embeddings().weight
    head = lm.get_output_embeddings().weight
    seen, total = set(), 0
    for name, param in lm.named_parameters():
        if "lora_" in name or param.data_ptr() in seen or (param is embedding and embedding is not head):
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            if getattr(state, "state2", None) is not None:
                total += state.state2.absmax.numel() * state.state2.absmax.element_size()
    if adapter is not None:
        total += sum(p.numel() * p.element_size() for n, p in lm.named_parameters()
                     if "lora_" in n and f".{adapter}." in n)
    return total


def layer_macs_per_token(model: nn.Module) -> int:
    """Multiply-adds of the decoder layers' linear layers for one token (the output head runs on one
    position a row in prefill, so it is left out of the prefill ceiling)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return sum(m.in_features * m.out_features for layer in lm.model.layers for name, m in layer.named_modules()
               if isinstance(m, nn.Linear) and "lora_" not in name)  # bnb's Linear4bit is an nn.Linear too
