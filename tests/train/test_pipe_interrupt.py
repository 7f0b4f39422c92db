"""Ctrl-C under a pipe: `sapo-lite train ... 2>&1 | tee log`, interrupted the way a terminal does it.

A terminal sends SIGINT to every process of the foreground pipeline: `tee` dies at once, and every
later write of sapo-lite to its stdout/stderr meets a closed pipe. The run must still finish its
step and write the checkpoint. The pipeline here is built as a shell builds it (one process group,
`tee` reading sapo-lite's stdout and stderr), paused at a named phase, SIGINT sent to the group,
`tee` seen dead, and only then let go, so the writes after the signal always meet the closed pipe.
"""

import json
import os
import signal
import subprocess
import time

import pytest
from helpers import TINY, cli

from sapo_lite.run.layout import RunDir

STEPS = 4


def piped_run(tmp_path, phase: str):
    """`sapo-lite train ... 2>&1 | tee log` in its own process group, paused at `phase`."""
    out, marker = tmp_path / "run", tmp_path / "paused"
    env = {**os.environ, "SAPO_TEST_PAUSE_AT": phase, "SAPO_TEST_PAUSE_FILE": str(marker)}
    args = ["train", *TINY, "--out", str(out), f"train.max_steps={STEPS}", "train.save_every=0"]
    trainer = subprocess.Popen(cli(*args), cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               process_group=0)
    tee = subprocess.Popen(["tee", str(tmp_path / "log")], stdin=trainer.stdout, stdout=subprocess.DEVNULL,
                           process_group=trainer.pid)
    trainer.stdout.close()  # tee alone reads the pipe, as in a shell
    deadline = time.monotonic() + 240
    while not marker.exists() and trainer.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), (tmp_path / "log").read_text()[-2000:]
    return trainer, tee, marker, out


@pytest.mark.slow
@pytest.mark.parametrize("phase, step", [("training:1", 1), ("buffer-write:2", 2)])
def test_ctrl_c_under_tee_ends_with_a_checkpoint(tmp_path, phase, step):
    trainer, tee, marker, out = piped_run(tmp_path, phase)
    os.killpg(trainer.pid, signal.SIGINT)  # what a terminal's Ctrl-C does to the foreground pipeline
    assert tee.wait(timeout=30) != 0  # tee is gone: from here on every write to the pipe fails (EPIPE)
    marker.unlink()  # let the run go on from the phase it paused at
    assert trainer.wait(timeout=240) == 0
    checkpoints = RunDir(out).completed_checkpoints()
    assert [p.name for p in checkpoints] == [f"step-{step}"]
    assert step in {rec["step"] for rec in map(json.loads, RunDir(out).metrics.read_text().splitlines())}
