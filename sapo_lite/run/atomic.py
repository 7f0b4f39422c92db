"""Writing a run's files so that a kill at any instant leaves the old version or the new one, never half.

Folders (checkpoints, final adapters) are published in four moves:

    1. fill `.tmp-NAME/`                      (a kill here leaves a `.tmp-*` leftover)
    2. give every file the user's usual permissions (safetensors writes owner-only files),
       fsync it, write manifest.json last      (its presence says every file above is complete)
    3. rename an existing `NAME/` to `.del-NAME/`   (never a half-deleted `NAME/`)
    4. rename `.tmp-NAME/` to `NAME/`, delete `.del-NAME/`

`remove_leftovers` clears what a killed writer leaves (`.tmp-*`, `.del-*`), and only the run's
writer calls it. Single files (summary.json, metrics.jsonl when rewound) are written to a
`.tmp-` sibling and `os.replace`d over the old one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import writing
from .folders import normal_permissions
from .manifest import write_manifest
from .testhook import pause_point


def staging_folder(final: Path) -> Path:
    """Where `final` is filled before it is published: a hidden sibling no reader takes for the real one."""
    return final.with_name(f".tmp-{final.name}")


@contextmanager
def removed_on_failure(tmp: Path) -> Iterator[None]:
    """A write that fails (a full disk above all) gives back the space its half-written folder took."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fsync_tree(folder: Path) -> None:
    """Flush every file before the rename that publishes them (a power cut must not reorder it)."""
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def publish_folder(tmp: Path, final: Path, run_dir: Path | None = None) -> Path:
    """Steps 2-4 above: `tmp` becomes `final`, replacing what was there, or nothing changes."""
    with writing(tmp, run_dir), removed_on_failure(tmp):
        normal_permissions(tmp)
        fsync_tree(tmp)
        write_manifest(tmp)
        doomed = _deletion_name(final)
        if doomed.exists():
            shutil.rmtree(doomed)
        if final.exists():
            final.rename(doomed)
        tmp.rename(final)
        if doomed.exists():
            shutil.rmtree(doomed)
    return final


def delete_folder(folder: Path, phase: str | None = None) -> None:
    """Rename, then delete: a kill half-way leaves `.del-*`, which no reader mistakes for the real one.

    `phase` names the test pause point between the two (run/testhook.py).
    """
    doomed = _deletion_name(folder)
    if doomed.exists():
        shutil.rmtree(doomed)
    folder.rename(doomed)
    if phase:
        pause_point(phase)
    shutil.rmtree(doomed)


def remove_leftovers(*roots: Path) -> None:
    """Clear what a killed writer leaves in `roots`: half-written `.tmp-*` and half-deleted `.del-*` entries."""
    for root in roots:
        if root.is_dir():
            for path in [*root.glob(".tmp-*"), *root.glob(".del-*")]:
                shutil.rmtree(path) if path.is_dir() else path.unlink()


def replace_file(path: Path, text: str, run_dir: Path | None = None) -> None:
    """Write `text` to `path` atomically: a reader sees the old file or the new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    with writing(path, run_dir if run_dir is not None else path.parent):
        tmp.write_text(text)
        os.replace(tmp, path)


def _deletion_name(folder: Path) -> Path:
    return folder.with_name(f".del-{folder.name}")
