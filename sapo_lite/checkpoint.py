"""Checkpoints and final adapters, written atomically.

A checkpoint is written into `checkpoints/.tmp-step-N/` and renamed to `step-N/` only when
complete, so a crash mid-write never leaves a folder that looks finished. It holds
everything a resumed run needs: both adapters (PEFT safetensors), optimizer and scheduler
state, every RNG state in play, the data position, and the newest buffer row at that step.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .model import EMA, POLICY

STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"


def save_adapters(model: Any, folder: Path, adapters: tuple[str, ...] = (POLICY, EMA)) -> None:
    """Save adapters as folder/<name>/ in PEFT format; `PeftModel.from_pretrained` loads each."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), selected_adapters=list(adapters), safe_serialization=True)


def rng_state(data_rng: np.random.Generator, sample_rng: np.random.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "data_rng": data_rng.bit_generator.state,
        "sample_rng": sample_rng.bit_generator.state,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    rngs: dict[str, Any],
    data_position: dict[str, int],
    buffer_last_id: int,
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically and keep only the newest `keep`."""
    root = run_dir / "checkpoints"
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_adapters(model, tmp / "adapters")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rngs},
        tmp / STATE_FILE,
    )
    info = {"step": step, "data_position": data_position, "buffer_last_id": buffer_last_id}
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in completed_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def completed_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / INFO_FILE).is_file() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))
