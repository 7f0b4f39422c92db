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
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import RunDirError, writing
from ..models.roles import EMA, POLICY, REF
from ..run.atomic import (
    delete_folder,
    publish_folder,
    remove_leftovers,
    removed_on_failure,
    replace_file,
    staging_folder,
)
from ..run.layout import CHECKPOINT_INFO, TRAINER_STATE, RunDir, checkpoint_problems, checkpoint_step
from ..run.records import finite_or_none, read_metrics
from ..run.testhook import pause_point
from ..sapo.buffer import ReplayBuffer
from .distributed import SINGLE, Processes

BEST_ADAPTER = "best-adapter"  # a checkpoint's copy of RUN/adapters/best


@dataclass
class CheckpointInfo:
    path: Path
    step: int
    data_position: dict[str, int]
    eval_before: float | None
    record: dict[str, Any] | None = None  # the metrics line of this step
    skipped: tuple[tuple[Path, str], ...] = ()  # newer checkpoints that are incomplete, and why
    processes: int = 1
    loop_state: dict[str, Any] = field(default_factory=dict)  # the loop's own counters (train/loop.py)


def save_adapters(model: Any, folder: Path, adapters: tuple[str, ...] = (POLICY, EMA)) -> None:
    """Save adapters as folder/<name>/ in PEFT format; `PeftModel.from_pretrained` loads each.

    peft is handed the LoRA tensors alone: by default it calls `model.state_dict()`, which walks every
    base weight, and on the CPU bitsandbytes' NF4 layers convert their weights out of the packed
    layout they use for inference to write them, a round trip that changes their quantisation
    constants: the base a run trained on after its first checkpoint was then not the base it resumes
    with (resumed losses differed by 1e-4). It also spares an 8B model's state dict at every save.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lora = {name: param.detach() for name, param in model.named_parameters() if "lora_" in name}
    model.save_pretrained(str(folder), selected_adapters=list(adapters), safe_serialization=True, state_dict=lora)


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
    loop_state: dict[str, Any] | None = None,
    best_adapter: Path | None = None,
) -> Path:
    """Write checkpoints/step-N atomically (run/atomic.py) and keep only the newest `keep`. Every rank calls it."""
    run = RunDir(run_dir)
    final = run.checkpoint(step)
    tmp = staging_folder(final)
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
                tmp / TRAINER_STATE,
            )
            info = {"step": step, "data_position": data_position, "eval_before": eval_before,
                    "metrics": finite_or_none(record) if record else None, "loop": loop_state or {}}
            if processes.count > 1:
                info["processes"] = processes.count
            (tmp / CHECKPOINT_INFO).write_text(json.dumps(info, indent=2))
            if best_adapter is not None:  # the best step's adapter as of this step: a resume puts it back
                shutil.copytree(best_adapter, tmp / BEST_ADAPTER)
    processes.barrier()  # every rank's buffer and RNG state are in before the folder is published
    if not processes.is_main:
        return final
    publish_folder(tmp, final, run_dir)
    stale = run.completed_checkpoints()[:-keep] + [p for p in run.incomplete_checkpoints() if checkpoint_step(p) < step]
    for old in stale:
        delete_folder(old, phase="checkpoint-rotate")
    return final


def remove_run_leftovers(run_dir: Path) -> None:
    """What a killed writer left in the run: `.tmp-*` and `.del-*` in the run, its checkpoints and adapters."""
    run = RunDir(run_dir)
    remove_leftovers(run.checkpoints, run.path, run.adapters)


# ---------------------------------------------------------------- resume


def latest_checkpoint(run_dir: Path) -> CheckpointInfo:
    """The newest complete checkpoint of a run, or a RunDirError that says what is wrong."""
    run = RunDir(run_dir).require_run()
    complete = run.completed_checkpoints()
    if not complete:
        found = "; ".join(f"{p.name}: {', '.join(checkpoint_problems(p))}" for p in run.incomplete_checkpoints())
        raise RunDirError(
            f"`{run_dir}` has no complete checkpoint to resume from" + (f" ({found})" if found else ""),
            "start it again with `--overwrite`, or keep `train.save_every` above 0 next time",
        )
    path = complete[-1]
    info = json.loads((path / CHECKPOINT_INFO).read_text())
    skipped = tuple((p, "; ".join(checkpoint_problems(p))) for p in run.incomplete_checkpoints()
                    if checkpoint_step(p) > info["step"])
    return CheckpointInfo(path, info["step"], info["data_position"], info.get("eval_before"),
                          info.get("metrics"), skipped, info.get("processes", 1), info.get("loop", {}))


def load_trainer_state(checkpoint: CheckpointInfo) -> dict[str, Any]:
    # weights_only: a checkpoint is data, never code to run.
    return torch.load(checkpoint.path / TRAINER_STATE, weights_only=True, map_location="cpu")


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
    kept = {logged.get("step", 0): logged for logged in read_metrics(path) if logged.get("step", 0) <= step}
    if record is not None:
        kept[step] = record
    replace_file(path, "".join(json.dumps(kept[s]) + "\n" for s in sorted(kept)), path.parent)


def restore_best_adapter(checkpoint: CheckpointInfo, run_dir: Path, is_main: bool) -> None:
    """RUN/adapters/best as it was at the checkpoint's step (a later best, written before a kill, is replaced)."""
    saved = checkpoint.path / BEST_ADAPTER
    if not (is_main and saved.is_dir()):
        return
    final = RunDir(run_dir).adapter("best")
    tmp = staging_folder(final)
    with writing(tmp, run_dir), removed_on_failure(tmp):
        if tmp.exists():
            shutil.rmtree(tmp)
        shutil.copytree(saved, tmp)
        (tmp / "manifest.json").unlink(missing_ok=True)  # written anew for the published folder
    publish_folder(tmp, final, run_dir)
