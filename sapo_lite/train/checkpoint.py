"""Checkpoints, resume and final adapters, all written atomically.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete, so a crash mid-write never leaves a folder that looks finished. It holds
everything a resumed run needs to continue exactly as if it had never stopped: both
adapters (PEFT safetensors), optimizer and scheduler state, every RNG state in play, the
data position, a snapshot of the replay buffer (pairs, draw counts and all), and the metrics
line of its own step. A manifest of files and sizes is written last: a checkpoint whose files do
not match it (a file deleted or cut short) is skipped with a warning, and resume continues from
the one before. Old checkpoints are renamed to `.del-step-N/` before they are deleted, so a kill
during rotation leaves a leftover that `remove_leftovers` clears, never a half-deleted `step-N/`.

With N processes, every rank writes its own buffer snapshot (`buffer-rankK.sqlite`) and RNG
state (`rng-rankK.pt`) into the same temporary folder; rank 0 writes the rest (adapters,
optimizer and scheduler are identical on every rank) and publishes the folder once all are in.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunDirError, writing
from ..models.roles import EMA, POLICY, REF
from ..run.manifest import has_manifest, manifest_problems, write_manifest
from ..run.testhook import pause_point
from ..sapo.buffer import ReplayBuffer
from .distributed import SINGLE, Processes
from .metrics import finite_or_none

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
BUFFER_FILE = "buffer.sqlite"


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    data_position: dict[str, int]
    eval_before: float | None
    record: dict[str, Any] | None = None  # the metrics line of this step
    skipped: tuple[tuple[Path, str], ...] = ()  # newer checkpoints that are incomplete, and why
    processes: int = 1


def save_adapters(model: Any, folder: Path, adapters: tuple[str, ...] = (POLICY, EMA)) -> None:
    """Save adapters as folder/<name>/ in PEFT format; `PeftModel.from_pretrained` loads each."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), selected_adapters=list(adapters), safe_serialization=True)


# ---------------------------------------------------------------- RNG state


def rng_state(data_rng: np.random.Generator, sample_rng: np.random.Generator) -> dict[str, Any]:
    """Every RNG a step draws from, in types that `torch.load(weights_only=True)` accepts."""
    legacy = list(np.random.get_state())
    legacy[1] = legacy[1].tolist()
    state = {
        "python": random.getstate(),
        "numpy": legacy,
        "torch": torch.get_rng_state(),
        "data_rng": data_rng.bit_generator.state,
        "sample_rng": sample_rng.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any], data_rng: np.random.Generator, sample_rng: np.random.Generator) -> None:
    random.setstate(state["python"])
    legacy = list(state["numpy"])
    legacy[1] = np.asarray(legacy[1], dtype=np.uint32)
    np.random.set_state(tuple(legacy))
    torch.set_rng_state(state["torch"])
    data_rng.bit_generator.state = state["data_rng"]
    sample_rng.bit_generator.state = state["sample_rng"]
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- save


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rngs: dict[str, Any],
    data_position: dict[str, int],
    buffer: ReplayBuffer,
    keep: int,
    eval_before: float | None = None,
    record: dict[str, Any] | None = None,
    processes: Processes = SINGLE,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`. Every rank calls it."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if processes.is_main and tmp.exists():
        shutil.rmtree(tmp)
    processes.barrier()
    with writing(tmp, run_dir), removed_on_failure(tmp):
        tmp.mkdir(parents=True, exist_ok=True)
        buffer.snapshot(tmp / buffer.path.name)
        if processes.count > 1:
            torch.save(rngs, tmp / processes.rng_file)
        if processes.is_main:
            save_adapters(model, tmp / "adapters", (POLICY, EMA, REF) if REF in model.peft_config else (POLICY, EMA))
            pause_point("checkpoint-write")
            torch.save(
                {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
                tmp / STATE_FILE,
            )
            info = {"step": step, "data_position": data_position, "eval_before": eval_before,
                    "metrics": finite_or_none(record) if record else None}
            if processes.count > 1:
                info["processes"] = processes.count
            (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    processes.barrier()  # every rank's buffer and RNG state are in before the folder is published
    if not processes.is_main:
        return final
    with writing(tmp, run_dir), removed_on_failure(tmp):
        _fsync_tree(tmp)
        write_manifest(tmp)  # last: its presence says every file above is complete
        if final.exists():
            _delete(final)
        tmp.rename(final)
    complete = completed_checkpoints(run_dir)
    stale = complete[:-keep] + [p for p in incomplete_checkpoints(run_dir) if _step(p) < step]
    for old in stale:
        _delete(old)
    return final


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """A write that fails (a full disk above all) gives back the space its half-written folder took."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _delete(folder: Path) -> None:
    """Rename, then delete: a kill half-way leaves `.del-*`, which no reader mistakes for a checkpoint."""
    doomed = folder.with_name(f".del-{folder.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    folder.rename(doomed)
    pause_point("checkpoint-rotate")
    shutil.rmtree(doomed)


def remove_leftovers(run_dir: Path) -> None:
    """Clear what a killed writer leaves: half-written `.tmp-*` and half-deleted `.del-*` folders."""
    for root in (run_dir / "checkpoints", run_dir):
        if root.is_dir():
            for path in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def _fsync_tree(folder: Path) -> None:
    """Flush every file before the rename that publishes them (a power cut must not reorder it)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def _step(path: Path) -> int:
    return int(path.name.split("-")[1])


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()), key=_step)


def checkpoint_problems(path: Path) -> list[str]:
    """Why a checkpoint folder cannot be used; empty when it is complete."""
    if has_manifest(path):
        return manifest_problems(path)
    # Checkpoints written before manifests existed: the files a resume reads must all be there.
    needed = (INFO_FILE, STATE_FILE, BUFFER_FILE, f"adapters/{POLICY}/adapter_model.safetensors")
    return [f"{name} is missing" for name in needed if not (path / name).is_file()]


def completed_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first; half-written or damaged ones never count."""
    return [p for p in _checkpoint_folders(run_dir) if not checkpoint_problems(p)]


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in _checkpoint_folders(run_dir) if checkpoint_problems(p)]


# ---------------------------------------------------------------- resume


def latest_checkpoint(run_dir: Path) -> CheckpointInfo:
    """The newest complete checkpoint of a run, or a RunDirError that says what is wrong."""
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(
            f"`{run_dir}` is not a sapo-lite run (no config.yaml)", "pass the --out folder of an earlier train"
        )
    complete = completed_checkpoints(run_dir)
    if not complete:
        found = "; ".join(f"{p.name}: {', '.join(checkpoint_problems(p))}" for p in incomplete_checkpoints(run_dir))
        raise RunDirError(
            f"`{run_dir}` has no complete checkpoint to resume from" + (f" ({found})" if found else ""),
            "start it again with `--overwrite`, or keep `train.save_every` above 0 next time",
        )
    path = complete[-1]
    info = json.loads((path / INFO_FILE).read_text())
    skipped = tuple((p, "; ".join(checkpoint_problems(p))) for p in incomplete_checkpoints(run_dir)
                    if _step(p) > info["step"])
    return CheckpointInfo(path, info["step"], info["data_position"], info.get("eval_before"),
                          info.get("metrics"), skipped, info.get("processes", 1))


def load_trainer_state(checkpoint: CheckpointInfo) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code to run.
    return torch.load(checkpoint.path / STATE_FILE, weights_only=True, map_location="cpu")


def rank_rng_state(checkpoint: CheckpointInfo, state: dict[str, Any], processes: Processes) -> dict[str, Any]:
    """This rank's RNG state: from trainer_state.pt for one process, its own file for each of N."""
    if processes.count == 1:
        return state["rng"]
    return torch.load(checkpoint.path / processes.rng_file, weights_only=True, map_location="cpu")


def load_adapter_weights(model: Any, checkpoint: CheckpointInfo) -> None:
    """Copy the checkpoint's adapters (policy, EMA, and a refreshed reference) into the live model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from ..models.roles import refresh_reference

    saved = [a for a in (POLICY, EMA, REF) if (checkpoint.path / "adapters" / a).is_dir()]
    if REF in saved and REF not in model.peft_config:
        refresh_reference(model)  # creates the `ref` adapter; its weights come from the file below
    for adapter in saved:
        weights = load_file(str(checkpoint.path / "adapters" / adapter / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RunDirError(
                f"checkpoint {checkpoint.path} does not match this model ({len(unexpected)} unknown tensors)",
                "resume with the run's own config.yaml (do not change model or lora settings)",
            )


def rewind_metrics(path: Path, step: int, record: dict[str, Any] | None = None) -> None:
    """Keep metrics.jsonl lines of steps before `step`, then the checkpoint's own line for `step`.

    By step number, not line count: a line cut short by a crash is dropped, and the checkpoint
    step's line is written again from what the checkpoint stored, so a resumed run logs every
    step exactly once.
    """
    if not path.is_file() and record is None:
        return
    kept: dict[int, str] = {}
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            logged = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if isinstance(logged, dict) and logged.get("step", 0) <= step:
            kept[logged.get("step", 0)] = line
    if record is not None:
        kept[step] = json.dumps(record)
    tmp = path.with_suffix(".tmp")
    with writing(path, path.parent):
        tmp.write_text("".join(kept[s] + "\n" for s in sorted(kept)))
        os.replace(tmp, path)
