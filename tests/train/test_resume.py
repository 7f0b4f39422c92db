"""Crash safety: SIGKILL at any moment loses nothing, and resume is exact."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed: minutes in all

TINY = ["--preset", "tiny", "loss.name=dpo", "loss.beta=0.1", "data.eval_path=null", "train.warmup_steps=2"]


def cli(*args):
    return [sys.executable, "-m", "sapo_lite.cli", "train", *args]


def run(args, cwd):
    proc = subprocess.run(cli(*args), cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


def start_and_kill(args, cwd, ready, extra_delay_s):
    """Start a run, wait until `ready()` holds, wait a little more, then SIGKILL it."""
    proc = subprocess.Popen(cli(*args), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(extra_delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize(
    "shape",
    [[], ["train.grad_accum=2", "train.micro_batch=8", "sapo.ema_every=3"], ["sapo.ref_refresh_steps=3"],
     ["sapo.generate_every=3"]],
    ids=["defaults", "accumulation-and-sparse-ema", "ema-refreshed-reference", "sparse-generation"],
)
def test_resume_after_sigkill_logs_the_same_losses_as_an_uninterrupted_run(tmp_path, shape):
    run([*TINY, *shape, "--out", "straight", "train.max_steps=10", "train.save_every=4"], tmp_path)
    straight, _ = losses(tmp_path / "straight")

    killed = tmp_path / "killed"
    args = [*TINY, *shape, "--out", "killed", "train.max_steps=10", "train.save_every=4"]
    # Kill during step 6 or 7: after checkpoint 4, with pairs added and metrics written past it.
    start_and_kill(args, tmp_path, lambda: len(losses(killed)[1]) >= 6 if (killed / "metrics.jsonl").exists()
                   else False, 0.0)
    assert (killed / "checkpoints" / "step-4").is_dir()
    assert not (killed / "adapters").exists()

    resumed = run(["--resume", "killed"], tmp_path)
    assert "resuming from step-4" in resumed.stdout
    after, steps = losses(killed)
    assert steps == list(range(1, 11))  # no step logged twice
    assert after == straight  # every loss identical: generation and buffer sampling included


@pytest.mark.parametrize("kill_after_steps,extra_delay_s", [(1, 0.0), (1, 0.02), (2, 0.01), (3, 0.03), (4, 0.005)])
def test_sigkill_at_any_point_leaves_a_resumable_run_and_a_sound_buffer(tmp_path, kill_after_steps, extra_delay_s):
    out = tmp_path / "run"
    args = [*TINY, "--out", "run", "train.max_steps=6", "train.save_every=1"]

    def ready():
        checkpoints = out / "checkpoints"
        return checkpoints.is_dir() and len([p for p in checkpoints.glob("step-*")]) >= 1 and (
            (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines())
            >= kill_after_steps
        )

    start_and_kill(args, tmp_path, ready, extra_delay_s)
    db = sqlite3.connect(out / "buffer.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    if (out / "adapters").exists():  # the kill came after the run finished
        return
    run(["--resume", "run"], tmp_path)
    _, steps = losses(out)
    assert steps == list(range(1, 7))
    assert (out / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    db = sqlite3.connect(out / "buffer.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli(*TINY, "--out", "run", "train.max_steps=500", "train.save_every=0"), cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "sapo-lite train --resume run" in stdout
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 1
    _, steps = losses(out)
    assert checkpoints[0].name == f"step-{steps[-1]}"


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
def test_the_8bit_gpu_optimizer_state_checkpoints_and_resumes(tmp_path):
    """The 8B presets' optimizer (bitsandbytes 8-bit AdamW) round-trips through torch.load(weights_only=True)."""
    from typer.testing import CliRunner

    from sapo_lite.cli import app

    runner = CliRunner()
    out = tmp_path / "run"
    first = runner.invoke(app, ["train", *TINY, "--out", str(out), "train.max_steps=4", "train.save_every=2",
                                "train.optimizer=paged_adamw_8bit"])
    assert first.exit_code == 0, first.output
    resumed = runner.invoke(app, ["train", "--resume", str(out), "train.max_steps=6"])
    assert resumed.exit_code == 0, resumed.output
    assert losses(out)[1] == [1, 2, 3, 4, 5, 6]
