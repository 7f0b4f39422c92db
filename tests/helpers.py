"""Start the CLI paused at a named phase (the SAPO_TEST_PAUSE_AT hook), so a test can kill it exactly there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TINY = ["--preset", "tiny", "data.eval_path=null", "train.warmup_steps=2", "train.num_threads=1"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_paused(cwd: Path, phase: str, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `sapo-lite ARGS` and return once it waits at `phase` (`name` or `name:n`)."""
    marker = cwd / f"paused-{time.monotonic_ns()}"
    env = {**os.environ, "COLUMNS": "300", "SAPO_TEST_PAUSE_AT": phase, "SAPO_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(cli(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if not marker.exists():
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"never paused at {phase}: {err[-3000:]}")
    return proc, marker


def metrics(run_dir: Path) -> dict[int, float]:
    """step -> loss; asserts every line is valid JSON and no step appears twice."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps
    return {r["step"]: r["loss"] for r in records}


def one_line_error(proc: subprocess.CompletedProcess) -> list[str]:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and len(lines) <= 2, proc.stderr[-3000:]
    assert len(lines) == 1 or lines[1].startswith("hint: ")
    return lines
