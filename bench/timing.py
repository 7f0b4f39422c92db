"""Timing that holds on a busy machine: contenders interleaved round by round, a fixed thread count,
and ratios taken within a round (both sides saw the same load), reported as median [min-max]."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def fix_threads(threads: int) -> int:
    """Pin torch's intra-op threads so a ratio does not depend on what else the machine runs."""
    torch.set_num_threads(threads)
    return torch.get_num_threads()


def interleaved(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, one call each per round, the order rotated every round."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def ratio(slow: list[float], fast: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of slow/fast over rounds."""
    values = [s / f for s, f in zip(slow, fast)]
    return statistics.median(values), min(values), max(values)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def ratio_text(slow: list[float], fast: list[float]) -> str:
    mid, low, high = ratio(slow, fast)
    return f"{mid:.2f} [{low:.2f}-{high:.2f}]"
