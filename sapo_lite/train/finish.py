"""The end of a run: final adapters, summary.json, and whether a run has finished.

The end is resumable. The last checkpoint is written before anything here runs, so a crash,
SIGTERM or Ctrl-C while the final adapters are written or the held-out evaluation runs leaves
a run whose newest checkpoint is at `train.max_steps` and no (or an older) summary: `--resume`
then loads that checkpoint and does only this part again, without training. The final adapters
are published like checkpoints (run/atomic.py); summary.json is replaced atomically, with
non-finite numbers as null.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import writing
from ..models.roles import POLICY
from ..run.atomic import publish_folder, removed_on_failure, replace_file, staging_folder
from ..run.layout import RunDir, adapter_damage
from ..run.records import finite_or_none
from ..run.testhook import pause_point
from .checkpoint import save_adapters


def save_final_adapters(model: Any, run_dir: Path) -> Path:
    final = RunDir(run_dir).adapters
    tmp = staging_folder(final)
    with writing(tmp, run_dir), removed_on_failure(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        save_adapters(model, tmp)
        best = final / "best"
        if best.is_dir():  # the best step's adapter (train/validation.py) stays among the final adapters
            shutil.copytree(best, tmp / "best", ignore=shutil.ignore_patterns("manifest.json"))
        pause_point("final-save")
    return publish_folder(tmp, final, run_dir)


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically; NaN or infinity becomes null (JSON has neither)."""
    pause_point("summary")
    replace_file(RunDir(run_dir).summary, json.dumps(finite_or_none(summary), indent=2), run_dir)


def run_is_finished(run_dir: Path, step: int) -> bool:
    """The run's end was written for checkpoint `step`: summary and complete, readable final adapters."""
    run = RunDir(run_dir)
    try:
        summary = json.loads(run.summary.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("steps") == step and not run.final_adapter_problems()
            and adapter_damage(run.adapter(POLICY)) is None)
