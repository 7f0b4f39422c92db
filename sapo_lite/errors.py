"""Errors a user can act on, and the OS failures that become one of them.

Every `SapoError` carries a one-line message naming the culprit and, where there is one,
a hint naming the fix. The CLI prints both and exits 1; anything else is a bug and keeps
its traceback.

A full disk reaches sapo-lite in several disguises: `OSError(ENOSPC)` from Python, a
`SafetensorError` whose text says "No space left on device", SQLite's "database or disk is
full", and torch's zip writer's "unexpected pos N vs M", which never mentions the disk (there
the free space decides). `writing(path, run_dir)` wraps a write and re-raises any of them as a
`StorageError` naming `path`, with the command that continues the run once space is freed;
anything it does not recognise passes through untouched.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class SapoError(Exception):
    """A problem with the user's input or environment, with the fix in `hint`."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class ConfigError(SapoError):
    """A preset, config file or override is unknown or invalid."""


class DataError(SapoError):
    """The training data cannot be found, read or used."""


class ModelError(SapoError):
    """The model, tokenizer or quantisation backend cannot be loaded."""


class RunDirError(SapoError):
    """The run directory is missing, not a run, or would be overwritten."""


class TrainingDiverged(SapoError):
    """The loss, gradients or EMA samples stopped being finite numbers."""


class StorageError(SapoError):
    """A run's file could not be written or read: full disk, read-only folder, damaged file."""


class ExportError(SapoError):
    """A model cannot be written in the asked format: an architecture, tokenizer, chat template or
    quantisation type the GGUF exporter does not handle, or a missing `gguf` package."""

DISK_FULL_TEXT = ("no space left on device", "database or disk is full", "disk quota exceeded")
LOW_FREE_BYTES = 256 * 2**20  # below this, torch's "unexpected pos" is read as a full disk


def storage_error(exc: BaseException, path: Path | str | None, run_dir: Path | None = None) -> SapoError | None:
    """The one-line error for `exc` met while writing `path`, or None when it is not a file-system failure."""
    where = str(path) if path is not None else "a file"
    code = exc.errno if isinstance(exc, OSError) else None
    text = str(exc).lower()
    resume = f"; then continue with `sapo-lite train --resume {run_dir}`" if run_dir is not None else ""
    if code in (errno.ENOSPC, errno.EDQUOT) or any(t in text for t in DISK_FULL_TEXT) or (
        "unexpected pos" in text and _free_bytes(path) < LOW_FREE_BYTES
    ):
        return StorageError(f"no space left on device while writing {where}",
                            f"free some space on that disk{resume or ' and run the command again'}")
    if code == errno.EROFS:
        return StorageError(f"read-only file system: cannot write {where}",
                            f"remount it read-write or use another folder{resume}")
    if code in (errno.EACCES, errno.EPERM):
        return StorageError(f"permission denied: cannot write {where}",
                            f"give your user write access to it{resume}")
    if isinstance(exc, OSError) and exc.strerror:
        return StorageError(f"{exc.strerror.lower()} while using {exc.filename or where}",
                            f"check the disk and the folder{resume}" if resume else None)
    return None


@contextmanager
def writing(path: Path, run_dir: Path | None = None) -> Iterator[None]:
    """Re-raise a file-system failure inside the block as a StorageError naming `path`."""
    try:
        yield
    except SapoError:
        raise
    except Exception as exc:  # OSError, SafetensorError, sqlite3.Error, torch's RuntimeError: sorted below
        error = storage_error(exc, path, run_dir)
        if error is None:
            raise
        raise error from exc


def _free_bytes(path: Path | str | None) -> int:
    probe = Path(path) if path is not None else Path.cwd()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0
