"""The end of a run: final adapters, summary.json, and whether a run has finished.

The end is resumable. The last checkpoint is written before anything here runs, so a crash,
SIGTERM or Ctrl-C while the final adapters are written or the held-out evaluation runs leaves
a run whose newest checkpoint is at `train.max_steps` and no (or an older) summary: `--resume`
then loads that checkpoint and does only this part again, without training. The final adapters
are written like checkpoints: into `.tmp-adapters/`, a manifest last, then renamed to `adapters/`.
summary.json is written to a temporary file and renamed, with non-finite numbers as null.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import writing
from ..models.roles import POLICY
from ..run.manifest import has_manifest, manifest_problems, write_manifest
from ..run.testhook import pause_point
from .checkpoint import removed_on_failure, save_adapters
from .metrics import finite_or_none

SUMMARY = "summary.json"


def save_final_adapters(model: Any, run_dir: Path) -> Path:
    final, tmp, doomed = run_dir / "adapters", run_dir / ".tmp-adapters", run_dir / ".del-adapters"
    with writing(tmp, run_dir), removed_on_failure(tmp):
        for leftover in (tmp, doomed):
            if leftover.exists():
                shutil.rmtree(leftover)
        save_adapters(model, tmp)
        pause_point("final-save")
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as handle:
                    os.fsync(handle.fileno())
        write_manifest(tmp)
        if final.exists():
            final.rename(doomed)
        tmp.rename(final)
        if doomed.exists():
            shutil.rmtree(doomed)
    return final


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically; NaN or infinity becomes null (JSON has neither)."""
    pause_point("summary")
    clean = finite_or_none(summary)
    path, tmp = run_dir / SUMMARY, run_dir / f".tmp-{SUMMARY}"
    with writing(path, run_dir):
        tmp.write_text(json.dumps(clean, indent=2))
        os.replace(tmp, path)


def final_adapter_problems(run_dir: Path) -> list[str]:
    folder = run_dir / "adapters"
    if has_manifest(folder):
        return manifest_problems(folder)
    policy = folder / POLICY / "adapter_model.safetensors"  # runs from before the manifest
    return [] if policy.is_file() else [f"{policy} is missing"]


def run_is_finished(run_dir: Path, step: int) -> bool:
    """The run's end was written for checkpoint `step`: summary and complete, readable final adapters."""
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(summary, dict) and summary.get("steps") == step and not final_adapter_problems(run_dir)
            and adapter_damage(run_dir / "adapters" / POLICY) is None)


def adapter_damage(folder: Path) -> str | None:
    """Why a PEFT adapter folder cannot be read (unparsable config, broken safetensors), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
            handle.keys()
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except ValueError as exc:
        return f"adapter_config.json is not valid JSON ({exc})"
    except (SafetensorError, OSError) as exc:
        return f"adapter_model.safetensors cannot be read ({str(exc).splitlines()[0]})"
    return None
