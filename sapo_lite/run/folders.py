"""Folders sapo-lite writes: created only where they can be, removed again when a run never started,
and never one the user did not get from sapo-lite.

A merged model folder carries MERGE_MARKER, so `merge --overwrite` replaces only folders that an
earlier merge wrote, never a downloaded base model or any other folder; a GGUF export replaces only
a GGUF file.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import RunDirError

MERGE_MARKER = "sapo_lite_merge.json"


def check_writable_dir(folder: Path, flag: str) -> None:
    """One line when `folder` cannot be created or written: a file in its path, or no permission."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"cannot create {flag} `{folder}`: `{existing}` is a file, not a folder",
                          f"choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {flag} `{folder}`: no permission to write in `{existing}`",
                          f"choose another {flag} (a folder you own)")


def make_dir(folder: Path, flag: str) -> Path | None:
    """Create `folder` (and parents); return the topmost folder created, None when it existed."""
    check_writable_dir(folder, flag)
    top = None
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        top = candidate
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a race, a read-only file system, a full disk
        raise RunDirError(f"cannot create {flag} `{folder}`: {exc.strerror}", f"choose another {flag}") from None
    return top


def remove_unstarted_run(run_dir: Path, created: Path | None) -> None:
    """Remove what a run that never trained left behind: the folders it created, or its files in an
    empty folder the user had made for it."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
    elif run_dir.is_dir():
        for entry in run_dir.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _check_outside_run(run_dir: Path, out: Path, example: str) -> None:
    run, target = run_dir.resolve(), out.resolve()
    if target == run or run in target.parents:
        raise RunDirError(f"--out `{out}` is inside the run `{run_dir}` being merged",
                          f"write the merged model outside the run, e.g. --out {example}")
    if target in run.parents:
        raise RunDirError(f"--out `{out}` holds the run `{run_dir}` being merged", "choose another --out")


def check_merge_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """`merge --out` is never inside the run being merged, nor a folder sapo-lite did not write."""
    _check_outside_run(run_dir, out, "merged/")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out `{out}` is a file", "choose a folder name for --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"`{out}` already exists", "choose another --out, or pass --overwrite to replace it")
        if not (out / MERGE_MARKER).is_file():  # --overwrite replaces earlier merges, never other folders
            raise RunDirError(f"`{out}` was not written by `sapo-lite merge`: refusing to replace it",
                              "choose another --out")
    check_writable_dir(out, "--out")


def check_gguf_out(run_dir: Path, out: Path, modelfile: Path, overwrite: bool) -> None:
    """`merge --out FILE.gguf` and its Modelfile: outside the run, and an existing file replaced only with
    --overwrite and only when it is a GGUF file (never a folder or another file that shares the name)."""
    from ..models.gguf_base import GGUF_MAGIC

    _check_outside_run(run_dir, out, out.name)
    for path in (out, modelfile):
        if path.is_dir():
            raise RunDirError(f"`{path}` is a folder", "GGUF export writes files: choose another --out")
    existing = next((path for path in (out, modelfile) if path.exists()), None)
    if existing is not None and not overwrite:
        raise RunDirError(f"`{existing}` already exists", "choose another --out, or pass --overwrite to replace it")
    if out.is_file():
        with out.open("rb") as handle:
            if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                raise RunDirError(f"`{out}` is not a GGUF file: refusing to replace it", "choose another --out")
    check_writable_dir(out.parent, "--out")


def write_merge_marker(folder: Path, run_dir: Path, adapter: str, dtype: str) -> None:
    (folder / MERGE_MARKER).write_text(json.dumps({"run": str(run_dir), "adapter": adapter, "dtype": dtype}))


def normal_permissions(folder: Path) -> None:
    """Files as the user's umask would make them: safetensors and mkdtemp create owner-only ones."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
