"""Every path of a run folder, in one place: the run-directory table of docs/run-directory.md as code.

    RUN/config.yaml          resolved config               RUN/summary.json     the end of a run
    RUN/metrics.jsonl        one line an optimizer step    RUN/held-out.json    before/after evaluation
    RUN/held_out.jsonl       the rows held out of the training data (`data.eval_path: holdout`), as read
    RUN/split.json           the data split (training / validation / held-out), decided once, checked on resume
    RUN/buffer.sqlite        replay buffer (buffer-rankK.sqlite, one per process)
    RUN/validation.sqlite    the validation split's pairs (made and scored by rank 0 alone)
    RUN/checkpoints/step-N/  adapters, trainer state, buffer snapshot, checkpoint.json, manifest.json
    RUN/adapters/{policy,ema,best}/   final adapters (best: with a validation split)    RUN/base_model/  bases
    RUN/.sapo-lite-run       marker and lock file

Everything that reads or writes a run asks a `RunDir` for its paths, so the layout is spelled
once. It also answers the questions every reader asks: is this a run at all, which checkpoints
are complete, and which adapter folder to load (the final one, else the newest checkpoint's),
checked for damage before anything is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import RunDirError, StorageError
from .manifest import has_manifest, manifest_problems

if TYPE_CHECKING:
    from ..config.schema import Config

MARKER = ".sapo-lite-run"
CHECKPOINT_INFO = "checkpoint.json"
TRAINER_STATE = "trainer_state.pt"
BUFFER = "buffer.sqlite"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
POLICY = "policy"  # the adapter a run trains (models/roles.py names the roles; this floor cannot import it)
BEST = "best"  # the policy of the best validation step (train/validation.py), kept beside the final adapters


@dataclass(frozen=True)
class RunDir:
    """The folder of one run; every path in it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    # ------------------------------------------------------------ files and folders

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def held_out(self) -> Path:
        """The end-of-training evaluation, one entry a role."""
        return self.path / "held-out.json"

    @property
    def held_out_rows(self) -> Path:
        """The rows a `holdout` run set aside from its training data, as they were read: what `eval RUN` scores."""
        return self.path / "held_out.jsonl"

    @property
    def split(self) -> Path:
        """The run's data split, decided when it started: the settings that decided it, each part's row fingerprint."""
        return self.path / "split.json"

    @property
    def validation_pairs(self) -> Path:
        """The validation split's pairs (train/validation.py), in the replay buffer's format."""
        return self.path / "validation.sqlite"

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    @property
    def base_model(self) -> Path:
        """The locally built (tiny) or dequantised (GGUF) base, inside the run."""
        return self.path / "base_model"

    @property
    def adapters(self) -> Path:
        return self.path / "adapters"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def debug(self) -> Path:
        return self.path / "debug"

    @property
    def plot(self) -> Path:
        return self.path / "plot.png"

    def adapter(self, name: str) -> Path:
        return self.adapters / name

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step}"

    @staticmethod
    def buffer_name(rank: int = 0, processes: int = 1) -> str:
        """`buffer.sqlite` for one process, `buffer-rankK.sqlite` for each of N."""
        return BUFFER if processes == 1 else f"buffer-rank{rank}.sqlite"

    # ------------------------------------------------------------ is it a run

    def is_run(self) -> bool:
        return self.config.is_file()

    def require_run(self) -> RunDir:
        """This run, or the one error every command gives for a folder that is not one."""
        if not self.is_run():
            raise RunDirError(f"`{self.path}` is not a sapo-lite run (no config.yaml)",
                              "pass the --out folder of an earlier `sapo-lite train`")
        return self

    def read_config(self) -> Config:
        """The run's resolved config (every field), as the run wrote it."""
        from ..config.sources import load_config

        return load_config(None, self.require_run().config)

    def base_model_name(self, cfg: Config) -> str:
        """The base the run trained on: the tiny base and dequantised GGUF bases live inside the run."""
        from ..models.gguf_base import is_gguf_base
        from ..models.tiny import TINY_NAME

        inside = cfg.model.name == TINY_NAME or is_gguf_base(cfg.model.name)
        return str(self.base_model) if inside else cfg.model.name

    # ------------------------------------------------------------ checkpoints

    def checkpoint_folders(self) -> list[Path]:
        """Every `step-N` folder, complete or not, oldest first."""
        if not self.checkpoints.is_dir():
            return []
        folders = (p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit())
        return sorted(folders, key=checkpoint_step)

    def completed_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first; half-written or damaged ones never count."""
        return [p for p in self.checkpoint_folders() if not checkpoint_problems(p)]

    def incomplete_checkpoints(self) -> list[Path]:
        return [p for p in self.checkpoint_folders() if checkpoint_problems(p)]

    # ------------------------------------------------------------ adapters

    def final_adapter_problems(self) -> list[str]:
        if has_manifest(self.adapters):
            return manifest_problems(self.adapters)
        policy = self.adapter(POLICY) / ADAPTER_WEIGHTS  # runs from before the manifest
        return [] if policy.is_file() else [f"{policy} is missing"]

    def adapter_to_load(self, name: str) -> Path:
        """The run's final `name` adapter, or the newest checkpoint's while the run trains; checked readable."""
        self.require_run()
        final = self.adapter(name)
        if (final / ADAPTER_WEIGHTS).is_file():
            return self._readable(final)
        checkpoints = self.completed_checkpoints()
        if checkpoints:
            return self._readable(checkpoints[-1] / "adapters" / name)
        if name == BEST:
            raise RunDirError(f"`{self.path}` kept no best adapter: it had no validation split, or none has "
                              "been scored yet", "train with data.val_size=N train.eval_every=M to keep one, "
                              "or use --adapter policy")
        raise RunDirError(f"`{self.path}` has no `{name}` adapter yet", "train it first, or wait for a checkpoint")

    def _readable(self, folder: Path) -> Path:
        problem = adapter_damage(folder)
        if problem is None:
            return folder
        final = folder.parent == self.adapters
        raise StorageError(
            f"adapter `{folder}` is damaged: {problem}",
            f"`sapo-lite train --resume {self.path}` rewrites the final adapters from the last checkpoint"
            if final else "delete that checkpoint folder to use the one before it",
        )


def adapter_in_run(path: Path) -> tuple[Path, str] | None:
    """(the run, the adapter's name) when `path` is a run's final adapter folder (RUN/adapters/best), else None:
    every command that takes a run also takes the folder of one of its adapters."""
    path = Path(path)
    if path.parent.name == "adapters" and RunDir(path.parent.parent).is_run() and path.name:
        return path.parent.parent, path.name
    return None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoint_problems(path: Path) -> list[str]:
    """Why a checkpoint folder cannot be used; empty when it is complete."""
    if has_manifest(path):
        return manifest_problems(path)
    # Checkpoints written before manifests existed: the files a resume reads must all be there.
    needed = (CHECKPOINT_INFO, TRAINER_STATE, BUFFER, f"adapters/{POLICY}/{ADAPTER_WEIGHTS}")
    return [f"{name} is missing" for name in needed if not (path / name).is_file()]


def adapter_damage(folder: Path) -> str | None:
    """Why a PEFT adapter folder cannot be read (unparsable config, broken safetensors), or None."""
    from safetensors import SafetensorError, safe_open

    try:
        json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as handle:
            handle.keys()
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except ValueError as exc:
        return f"adapter_config.json is not valid JSON ({exc})"
    except (SafetensorError, OSError) as exc:
        return f"{ADAPTER_WEIGHTS} cannot be read ({str(exc).splitlines()[0]})"
    return None
