"""The edges of a run: one writer, a clean start, complete checkpoints, a resumable end, every step logged.

Each test pauses a real `sapo-lite train` at a named phase (the SAPO_TEST_PAUSE_AT hook) and
kills it exactly there, then checks what a user would see next.
"""

import json
import shutil
import signal

import pytest
from helpers import TINY, metrics, one_line_error, run, start_paused

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed: minutes in all

STEPS = ["train.max_steps=6", "train.save_every=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """step -> loss of an uninterrupted 6-step run."""
    cwd = tmp_path_factory.mktemp("straight")
    run(cwd, "train", *TINY, *STEPS, "--out", "run")
    return metrics(cwd / "run")


def test_a_second_writer_fails_at_once_and_readers_keep_working(tmp_path, straight):
    proc, marker = start_paused(tmp_path, "generation:4", "train", *TINY, *STEPS, "--out", "run")
    try:
        for second in (["--resume", "run"], [*TINY, "--out", "run", "--overwrite"], [*TINY, "--out", "run"]):
            lines = one_line_error(run(tmp_path, "train", *second, ok=False))
            assert lines[0] == f"error: run `run` is being written by another sapo-lite process (pid {proc.pid})"
        assert (tmp_path / "run" / "checkpoints" / "step-2").is_dir()  # --overwrite deleted nothing
        run(tmp_path, "plot", "run")
        assert "pairs:" in run(tmp_path, "buffer", "run").stdout
        run(tmp_path, "merge", "run", "--out", "merged")
        assert (tmp_path / "merged" / "config.json").is_file()
    finally:
        marker.unlink(missing_ok=True)
    proc.communicate(timeout=300)
    assert proc.returncode == 0
    assert metrics(tmp_path / "run") == straight  # the first writer was never disturbed


@pytest.mark.parametrize("phase", ["final-save", "final-eval", "summary"])
def test_sigkill_at_the_end_then_resume_finishes_without_training(tmp_path, straight, phase):
    args = [*TINY, *STEPS, "--out", "run"]
    if phase == "final-eval":  # the held-out evaluation, on a few examples
        args = [a for a in args if a != "data.eval_path=null"] + ["data.eval_size=4"]
    proc, _ = start_paused(tmp_path, phase, "train", *args)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = tmp_path / "run"
    assert not (out / "summary.json").exists()

    resumed = run(tmp_path, "train", "--resume", "run")
    assert "resuming from step-6 to finish the run" in resumed.stdout
    assert metrics(out) == straight  # nothing trained again, nothing lost
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_loss"] == straight[6]
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp", ".del"))]
    run(tmp_path, "merge", "run", "--out", "merged")  # the final adapters load
    again = one_line_error(run(tmp_path, "train", "--resume", "run", ok=False))
    assert "already finished its 6 steps" in again[0]


def test_sigterm_during_the_final_evaluation_says_how_to_finish(tmp_path):
    args = [a for a in TINY if a != "data.eval_path=null"]
    proc, _ = start_paused(tmp_path, "final-eval", "train", *args, *STEPS, "data.eval_size=4", "--out", "run")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert stderr.strip().splitlines() == [
        "error: interrupted before the run finished",
        "hint: resume from the last checkpoint: sapo-lite train --resume run",
    ]
    run(tmp_path, "train", "--resume", "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_exact_match_policy"] is not None


def test_an_incomplete_checkpoint_is_skipped_and_resume_continues_from_the_one_before(tmp_path, straight):
    proc, _ = start_paused(tmp_path, "generation:5", "train", *TINY, *STEPS, "--out", "run",
                           "train.keep_checkpoints=3")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = tmp_path / "run"
    shutil.rmtree(out / "checkpoints" / "step-4" / "adapters")

    resumed = run(tmp_path, "train", "--resume", "run")
    assert "warning: skipping incomplete checkpoint run/checkpoints/step-4" in resumed.stdout
    assert "resuming from step-2" in resumed.stdout
    assert metrics(out) == straight  # trained from step 2's adapters, not from fresh ones


def test_a_kill_during_checkpoint_rotation_leaves_nothing_behind(tmp_path, straight):
    proc, _ = start_paused(tmp_path, "checkpoint-rotate", "train", *TINY, *STEPS, "--out", "run",
                           "train.keep_checkpoints=1")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".del-step-2", "step-4"]

    run(tmp_path, "train", "--resume", "run")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-6"]
    assert metrics(tmp_path / "run") == straight


def test_a_truncated_metrics_line_of_the_checkpoint_step_is_logged_again(tmp_path, straight):
    proc, _ = start_paused(tmp_path, "generation:5", "train", *TINY, *STEPS, "--out", "run")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    assert len(lines) == 4
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # step 4, the checkpoint's

    run(tmp_path, "train", "--resume", "run")
    assert metrics(tmp_path / "run") == straight


def test_a_run_killed_before_its_config_is_recognised_and_overwrite_restarts_it(tmp_path):
    proc, _ = start_paused(tmp_path, "startup", "train", *TINY, *STEPS, "--out", "run")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    out = tmp_path / "run"
    assert (out / "base_model").is_dir() and not (out / "config.yaml").exists()

    resumed = one_line_error(run(tmp_path, "train", "--resume", "run", ok=False))
    assert resumed[0] == "error: `run` was stopped before training started: there is nothing to resume"
    assert "--overwrite" in resumed[1]
    plain = one_line_error(run(tmp_path, "train", *TINY, *STEPS, "--out", "run", ok=False))
    assert "--overwrite" in plain[1]
    run(tmp_path, "train", *TINY, *STEPS, "--out", "run", "--overwrite")
    assert json.loads((out / "summary.json").read_text())["steps"] == 6


def test_sigterm_before_the_first_step_removes_the_run_like_ctrl_c(tmp_path):
    proc, _ = start_paused(tmp_path, "startup", "train", *TINY, *STEPS, "--out", "run")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert not (tmp_path / "run").exists()


def test_a_damaged_adapter_file_is_one_line_for_merge_and_generate_and_resume_rewrites_it(tmp_path):
    run(tmp_path, "train", *TINY, "train.max_steps=2", "--out", "run")
    config = tmp_path / "run" / "adapters" / "policy" / "adapter_config.json"
    config.write_text(config.read_text()[:40])
    for command in (["merge", "run", "--out", "merged"], ["generate", "run", "--prompt", "reverse : 1 2"]):
        lines = one_line_error(run(tmp_path, *command, ok=False))
        assert lines[0].startswith("error: adapter `run/adapters/policy` is damaged: adapter_config.json is not")
        assert lines[1] == "hint: `sapo-lite train --resume run` rewrites the final adapters from the last checkpoint"
    run(tmp_path, "train", "--resume", "run")
    run(tmp_path, "merge", "run", "--out", "merged")
