"""Crash safety: SIGKILL at any moment loses nothing, and resume is exact."""

import json
import signal
import sqlite3

import helpers
import pytest
from helpers import start_paused

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed: minutes in all

TINY = ["--preset", "tiny", "loss.name=dpo", "loss.beta=0.1", "data.eval_path=null", "train.warmup_steps=2"]


def run(args, cwd):
    return helpers.run(cwd, "train", *args)


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}, [r["step"] for r in records]


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
    # Killed in the policy update of step 7: after checkpoint 4, with pairs added and steps 5-6 logged past it.
    proc, _ = start_paused(tmp_path, "training:7", "train", *TINY, *shape, "--out", "killed", "train.max_steps=10",
                           "train.save_every=4")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert losses(killed)[1] == list(range(1, 7))
    assert (killed / "checkpoints" / "step-4").is_dir() and not (killed / "adapters").exists()

    resumed = run(["--resume", "killed"], tmp_path)
    assert "resuming from step-4" in resumed.stdout
    after, steps = losses(killed)
    assert steps == list(range(1, 11))  # no step logged twice
    assert after == straight  # every loss identical: generation and buffer sampling included
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["wall_s"] > summary["wall_s_since_resume"] > 0  # the whole run's time, and the resumed part


PHASES = ["generation:2", "reference:2", "buffer-write:2", "training:2", "checkpoint-write:2", "checkpoint-rotate:1",
          "final-save", "summary"]


EVERY_STEP = [*TINY, "train.max_steps=4", "train.save_every=1"]


@pytest.fixture(scope="module")
def every_step(tmp_path_factory):
    """The uninterrupted run the killed ones are compared with: step -> loss."""
    cwd = tmp_path_factory.mktemp("straight")
    run([*EVERY_STEP, "--out", "straight"], cwd)
    return losses(cwd / "straight")[0]


@pytest.mark.parametrize("phase", PHASES)
def test_sigkill_at_every_phase_leaves_a_resumable_run_and_a_sound_buffer(tmp_path, every_step, phase):
    """A SIGKILL at each named phase of a step or of the run's end (checkpoints every step): the buffer is sound,
    and the resumed run ends with every step logged once and the same losses as an uninterrupted run."""
    args = EVERY_STEP
    out = tmp_path / "run"
    proc, _ = start_paused(tmp_path, phase, "train", *args, "--out", "run")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    db = sqlite3.connect(out / "buffer.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    assert not (out / "summary.json").exists()  # every phase comes before the run's end is written
    run(["--resume", "run"], tmp_path)
    after, steps = losses(out)
    assert steps == [1, 2, 3, 4] and after == every_step
    assert (out / "adapters" / "policy" / "adapter_model.safetensors").is_file()
    db = sqlite3.connect(out / "buffer.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()


def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """Ctrl-C during step 3's update: the step finishes, a checkpoint of step 3 is written, and the command says how
    to resume."""
    out = tmp_path / "run"
    proc, marker = start_paused(tmp_path, "training:3", "train", *TINY, "--out", "run", "train.max_steps=500",
                                "train.save_every=0")
    proc.send_signal(signal.SIGINT)
    marker.unlink()  # let the paused step go on: the handler has set the stop request
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped after step 3; resume with: sapo-lite train --resume run" in stdout
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-3"]
    assert losses(out)[1] == [1, 2, 3]


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
