"""The commands the dashboard starts: `sapo-lite train`, `train --resume` and `merge`, each as its own process.

The dashboard runs the CLI itself (`python -m sapo_lite.cli ...`), so a run started from the form goes through
the same checks, the same run lock and the same Ctrl-C handling as one started in a terminal. Stopping
sends SIGINT, as Ctrl-C does: the step finishes, a checkpoint is
written, and the run can be resumed. Each job keeps the last lines its process printed, which the page shows
as progress. When the dashboard quits, the runs it started are stopped the same way (Ctrl-C in its terminal
reaches them too), so none is left training unwatched with nowhere to print.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

LOG_LINES = 40


@dataclass
class Job:
    job_id: int
    kind: str  # train, resume or export
    run: str  # the run's name inside RUNS_DIR
    argv: list[str]
    process: subprocess.Popen
    started_s: float = field(default_factory=time.time)
    lines: deque = field(default_factory=lambda: deque(maxlen=LOG_LINES))

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def error(self) -> str | None:
        """The CLI's `error:` and `hint:` lines, when the command failed."""
        if not self.returncode:
            return None
        said = [line for line in self.lines if line.startswith(("error:", "hint:"))]
        return "\n".join(said) or f"exited with code {self.returncode}"

    def to_dict(self) -> dict:
        return {"id": self.job_id, "kind": self.kind, "run": self.run, "command": " ".join(self.argv[2:]),
                "running": self.returncode is None, "returncode": self.returncode, "error": self.error(),
                "log": list(self.lines), "started_s": self.started_s}


class Jobs:
    """The processes this dashboard started, newest last."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self._jobs: list[Job] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def start(self, kind: str, run: str, args: list[str]) -> Job:
        argv = [sys.executable, "-m", "sapo_lite.cli", *args]
        # COLUMNS: rich's lines are not cut at 80 columns; the job's output is a pipe, not a terminal.
        env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen(argv, cwd=self.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, text=True, bufsize=1)
        job = Job(next(self._ids), kind, run, argv, process)
        threading.Thread(target=_pump, args=(job,), daemon=True, name=f"job-{job.job_id}").start()
        with self._lock:
            self._jobs.append(job)
        return job

    def running_for(self, run: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.run == run and j.returncode is None), None)

    def latest_for(self, run: str) -> Job | None:
        with self._lock:
            return next((j for j in reversed(self._jobs) if j.run == run), None)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs)

    def stop_all(self) -> None:
        """When the dashboard quits: its exports stop; its training runs get Ctrl-C and write a checkpoint."""
        for job in self.all():
            if job.returncode is None:
                interrupt(job.process.pid)
        for job in self.all():
            try:
                job.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                job.process.kill()


def interrupt(pid: int) -> None:
    """Ctrl-C for one process: SIGINT."""
    os.kill(pid, signal.SIGINT)


def _pump(job: Job) -> None:
    assert job.process.stdout is not None
    for line in job.process.stdout:
        # rich's progress bar redraws with carriage returns: keep the last state of each line
        job.lines.append(line.rstrip("\n").rsplit("\r", 1)[-1])
    job.process.wait()
