"""How many CPU threads torch uses when `train.num_threads` is not set.

torch's default (every logical core) is a bad choice on small or shared machines: on a 2-core
machine running other work, the tiny demo ran 8x slower with the default than with one thread,
because threads that wait for a core stall every matrix multiply. The rule:

- the machine (what this process may run on) has <= 2 cores: 1 thread;
- otherwise the physical cores that the 1-minute load average leaves idle, at least 1;
- on CUDA torch's own default stays: the GPU does the work.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def physical_cores() -> int:
    """Distinct (package, core) pairs in /proc/cpuinfo; the logical count where that is not readable."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return usable_cores()
    cores, package = set(), "0"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "physical id":
            package = value.strip()
        elif key.strip() == "core id":
            cores.add((package, value.strip()))
    return len(cores) or usable_cores()


def auto_threads(cores: int, physical: int, load: float) -> tuple[int, str]:
    """(threads, why) for `cores` usable logical cores, `physical` physical ones, a 1-minute load average."""
    if cores <= 2:
        return 1, f"{cores} cores"
    physical = min(physical, cores)
    idle = int(cores - load)
    if idle < physical:
        return max(1, idle), f"{physical} physical cores, load {load:.1f}"
    return physical, f"{physical} physical cores"


def apply_threads(requested: int | None, device: torch.device) -> str | None:
    """Set torch's thread count (`requested`, else the rule above); the line to show, None on CUDA defaults."""
    if requested:
        torch.set_num_threads(requested)
        return f"CPU threads: {requested} (train.num_threads)"
    if device.type == "cuda":
        return None
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads, why = auto_threads(usable_cores(), physical_cores(), load)
    torch.set_num_threads(threads)
    return f"CPU threads: {threads} (auto: {why}; set train.num_threads to choose)"
