"""Helpers every test folder shares: the CLI in-process (`fails`) and as a subprocess (`run`,
`start_paused` at a named phase of the SAPO_TEST_PAUSE_AT hook, so a test can kill it exactly
there), data files, folder snapshots and metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from sapo_lite.cli import app

TINY = ["--preset", "tiny", "data.eval_path=null", "train.warmup_steps=2", "train.num_threads=1"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def run(cwd: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300"})
    if ok:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def start_paused(cwd: Path, phase: str, *args: str, command: list[str] | None = None,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen, Path]:
    """Start `sapo-lite ARGS` (or `command`) and return once it waits at `phase` (`name` or `name:n`)."""
    marker = cwd / f"paused-{time.monotonic_ns()}"
    env = {**(env or os.environ), "COLUMNS": "300", "SAPO_TEST_PAUSE_AT": phase, "SAPO_TEST_PAUSE_FILE": str(marker)}
    proc = subprocess.Popen(command or cli(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
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


runner = CliRunner()


def fails(args: list[str], *expected: str) -> str:
    """Run the CLI in-process; check exit 1, `error:` + at most a `hint:` line, no traceback, and the expected words."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and len(lines) <= 2, result.output
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.output
    assert "Traceback" not in result.output
    for word in expected:
        assert word in result.output, (word, result.output)
    return result.output


def snapshot(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` with its bytes: equal snapshots mean nothing was touched."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    """A TCP port nobody listens on, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
