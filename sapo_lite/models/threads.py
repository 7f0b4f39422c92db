"""How many CPU threads torch uses when `train.num_threads` is not set.

torch's default (every logical core) is a bad choice on small or shared machines: on a 2-core
machine running other work, the tiny demo ran 8x slower with the default than with one thread,
because threads that wait for a core stall every matrix multiply. The rule:

- the machine (what this process may run on) has <= 2 cores: 1 thread;
- otherwise the physical cores that the 1-minute load average leaves idle, at least 1;
- on CUDA torch's own default stays: the GPU does the work.

A generation phase may use more (`DecodeThreads`): decoding a few rows streams every weight from
memory, and one core cannot draw the machine's bandwidth alone (SmolLM2 fp32, batch 4: every matmul
of a decode step, timed alone, at 24.9 GB/s on one thread, 37.9 on two). So when the rest of
the machine left cores idle over the last stretch (measured: all CPUs' busy time from /proc/stat,
minus this process's own), generation takes them and gives them back after; training keeps its
count, and a machine that is busy keeps the count it had.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from types import TracebackType

import torch


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, lowered to a container's CPU quota (cgroup v2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """CPUs allowed by /sys/fs/cgroup/cpu.max ("200000 100000" = 2), None when unlimited or unreadable."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return int(quota) / int(period)
    except (OSError, ValueError):  # no cgroup v2 here, or "max" (no limit)
        return None


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


def choose_threads(requested: int | None, device: torch.device) -> tuple[str | None, DecodeThreads | None]:
    """`apply_threads`, plus the chooser for generating when the count is automatic on the CPU; the line
    to print says both."""
    line = apply_threads(requested, device)
    if line is None or requested or device.type != "cpu":
        return line, None
    decode = DecodeThreads(torch.get_num_threads())
    if decode.cores > decode.train_threads:
        line += f"; generating: up to {decode.cores} while the other cores are idle"
    return line, decode


def decode_thread_count(train_threads: int, cores: int, others_busy: float, slack: float = 0.25) -> int:
    """Threads for a generation phase: the cores others left idle (`others_busy` cores' worth of their
    work), never fewer than training's own count; a core counts as idle when others took at most `slack` of it."""
    return max(train_threads, min(cores, int(cores - others_busy + slack)))


def cpu_times() -> tuple[float, float, float] | None:
    """(wall seconds, busy CPU-seconds of the whole machine, CPU-seconds of this process) now; None where the
    machine's figure cannot be read (no /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(value) for value in fields[1:9]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]  # steal too: a hypervisor's other guests had the core
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), time.process_time()


class DecodeThreads:
    """`with DecodeThreads(n):` around a generation phase: torch's threads raised to the cores the rest of
    the machine left idle since the previous phase (at most once a `window_s`), set back on exit."""

    def __init__(self, train_threads: int, window_s: float = 1.0) -> None:
        self.train_threads, self.window_s = train_threads, window_s
        self.cores = min(physical_cores(), usable_cores())
        self.threads = train_threads
        self._last = cpu_times()
        self._before = train_threads

    def choose(self) -> int:
        """The count for the phase about to start, from what others did since the last choice."""
        now = self._last and cpu_times()
        if now is None:
            return self.train_threads
        wall = now[0] - self._last[0]
        if wall >= self.window_s:  # shorter stretches are too coarse for 10 ms ticks: keep the last choice
            others_busy = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
            self.threads = decode_thread_count(self.train_threads, self.cores, others_busy)
            self._last = now
        return self.threads

    def __enter__(self) -> DecodeThreads:
        self._before = torch.get_num_threads()
        if (threads := self.choose()) != self._before:
            torch.set_num_threads(threads)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if torch.get_num_threads() != self._before:
            torch.set_num_threads(self._before)
