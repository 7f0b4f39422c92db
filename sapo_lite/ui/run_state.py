"""What the Runs page says about each run, read through `RunDir` like every other reader of a run.

A run is *training* while a process holds its lock (run/lock.py), *finished* when its end was written
(train/finish.py), *stopped* when it has a checkpoint to resume from, and *failed* otherwise, or when the
command the dashboard started for it ended with an error other than an interruption.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SapoError
from ..run.layout import RunDir
from ..run.lock import writer_pid
from ..run.records import read_metrics
from ..tools.open_run import is_model_folder
from ..train.finish import run_is_finished
from .jobs import Jobs
from .safety import Refused, inside_runs

TRAINING, STARTING, FINISHED, STOPPED, FAILED = "training", "starting", "finished", "stopped", "failed"
LIVE = (TRAINING, STARTING)  # the states the page keeps polling; a finished run costs nothing


def run_names(runs_dir: Path) -> list[str]:
    """The runs directly inside RUNS_DIR (folders with a config.yaml), by name."""
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and RunDir(p).is_run())


def model_folder_names(runs_dir: Path) -> list[str]:
    """Plain model folders inside RUNS_DIR (what `merge` writes): the Chat page answers with them too."""
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.is_dir() and is_model_folder(p))


def run_folder(runs_dir: Path, name: str | None) -> Path:
    """The run `name` directly inside RUNS_DIR; refused when the name leaves RUNS_DIR or is not a run there."""
    path = inside_runs(runs_dir, name)
    if path.parent != runs_dir.resolve() or not RunDir(path).is_run():
        raise Refused(f"`{name}` is not a run in {runs_dir}", 404)
    return path


def run_info(runs_dir: Path, name: str, jobs: Jobs) -> dict[str, Any]:
    """Name, state, step, loss, best validation step, held-out before -> after, and how to resume."""
    run = RunDir(runs_dir / name)
    records = read_metrics(run.metrics)
    last = records[-1] if records else {}
    info: dict[str, Any] = {"name": name, "step": last.get("step", 0), "loss": last.get("loss"), "points": len(records),
                            "max_steps": None, "best_step": None, "held_out": None, "resume": None, "error": None}
    try:
        if run.is_run():  # a run being started has no config.yaml yet
            info["max_steps"] = run.read_config().train.max_steps
    except SapoError as exc:  # a config another version wrote, or damaged: say so, keep listing the others
        info["error"] = exc.message
    best = [r["val/best_step"] for r in records if r.get("val/best_step") is not None]
    info["best_step"] = best[-1] if best else None
    summary = _summary(run)
    info["held_out"] = _held_out(summary)
    info["state"], info["pid"] = _state(run, summary, jobs.latest_for(name), info)
    if info["state"] in (STOPPED, FAILED) and run.completed_checkpoints():
        info["resume"] = f"sapo-lite train --resume {run.path}"
    return info


def _state(run: RunDir, summary: dict, job: Any, info: dict) -> tuple[str, int | None]:
    pid = writer_pid(run.path)
    if pid is not None:
        return TRAINING, pid
    if job is not None and job.kind in ("train", "resume") and job.returncode is None:
        return STARTING, job.process.pid  # loading the model; the lock comes next
    steps = summary.get("steps")
    if isinstance(steps, int) and run_is_finished(run.path, steps):
        return FINISHED, None
    error = job.error() if job is not None and job.kind in ("train", "resume") else None
    if error and "interrupted" not in error:
        info["error"] = error
        return FAILED, None
    if run.completed_checkpoints():
        return STOPPED, None
    info["error"] = info["error"] or "no checkpoint was written: nothing to resume"
    return FAILED, None


def _summary(run: RunDir) -> dict:
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _held_out(summary: dict) -> dict | None:
    """The held-out figure before and after training (base -> policy), as `train` prints it at the end."""
    for metric in ("constraints", "exact_match"):
        before, after = summary.get(f"eval_{metric}_base"), summary.get(f"eval_{metric}_policy")
        if before is not None and after is not None:
            return {"metric": metric.replace("_", " "), "before": before, "after": after}
    return None


def metric_records(path: Path, since: int) -> list[dict]:
    """metrics.jsonl's complete step records from index `since` on (the page asks only for what is new)."""
    return read_metrics(RunDir(path).metrics)[since:]
