"""Who may write a run directory: one process at a time, and only in folders sapo-lite made.

`RUN/.sapo-lite-run` is written first, before anything else in a new run, so a folder
sapo-lite made is recognisable as its own even when it was killed before `config.yaml`
existed. The same file is the run's lock: a writer (`train`, `train --resume`,
`train --overwrite`) holds an exclusive `fcntl.flock` on it for as long as it runs, and
writes its pid into it. The OS drops the lock when the process dies, however it dies, so a
crash never leaves a stale lock. Readers (`merge`, `generate`, `plot`, `buffer`) never lock.
On systems without `fcntl` (Windows) the marker is written but nothing is locked.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import RunDirError
from .layout import MARKER, RunDir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def is_sapo_run(folder: Path) -> bool:
    """A folder sapo-lite made: it has the marker, or (runs from before the marker) a config.yaml."""
    return (folder / MARKER).is_file() or RunDir(folder).is_run()


def writer_pid(folder: Path) -> int | None:
    """The pid of the process holding the run's lock now (a `train` writing it), or None.

    Read from /proc/locks, which lists every flock with the holder's pid and the file's device and
    inode: looking takes no lock, so it can never make a `train` starting at that instant fail. On
    systems without /proc/locks a non-blocking shared lock is tried and dropped at once instead.
    """
    marker = folder / MARKER
    try:
        stat = marker.stat()
    except OSError:
        return None
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return _probe_lock(marker)
    where = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    for line in table.splitlines():
        fields = line.split()  # `1: FLOCK  ADVISORY  WRITE 1234 fe:00:2164632 0 EOF`
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            return int(fields[4])
    return None


def _probe_lock(marker: Path) -> int | None:
    if fcntl is None:
        return None
    fd = os.open(marker, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip()
        return int(holder) if holder.isdigit() else -1
    finally:
        os.close(fd)  # drops the shared lock if it was taken
    return None


def never_started(folder: Path) -> bool:
    """Made by sapo-lite but stopped before its config was written: nothing in it to resume."""
    return (folder / MARKER).is_file() and not RunDir(folder).is_run()


class RunLock:
    """The exclusive right to write `run_dir`; creates the folder and its marker if needed."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunDirError(
                    f"run `{self.run_dir}` is being written by another sapo-lite process (pid {holder})",
                    f"wait for it to finish or stop it (kill {holder}); merge, generate, plot and buffer "
                    "work on the run meanwhile",
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def clear_run(run_dir: Path) -> None:
    """Delete a run's contents but keep its marker, so the lock held on it stays meaningful."""
    for path in run_dir.iterdir():
        if path.name == MARKER:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
