"""Ctrl-C and SIGTERM finish the current step, save a checkpoint and exit cleanly.

A second Ctrl-C abandons the step at once; the newest complete checkpoint is then where
`--resume` continues.

Under a pipe (`sapo-lite train ... 2>&1 | tee log`) a terminal's Ctrl-C reaches `tee` too, which
dies at once: every later write to stdout or stderr then fails with EPIPE. `console_survives_pipe`
makes the console drop its output from then on instead, so the step, the checkpoint and
metrics.jsonl (a file of its own) are written as they would be on a terminal.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from types import FrameType
from typing import Any, TextIO


class SurvivesBrokenPipe:
    """A text stream (stdout or stderr) that, once its reader has gone (EPIPE), drops what is written to it.

    Its file descriptor is pointed at /dev/null then, so the interpreter's own flush at exit (and any
    library writing to the descriptor) succeeds too, instead of an "Exception ignored ... BrokenPipeError"."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.broken = False

    def _guarded(self, action: str, *args: Any) -> Any:
        if self.broken:
            return len(args[0]) if action == "write" else None
        try:
            return getattr(self._stream, action)(*args)
        except OSError as exc:
            if not isinstance(exc, BrokenPipeError) and exc.errno != errno.EPIPE:
                raise
            self._go_quiet()
            return len(args[0]) if action == "write" else None

    def _go_quiet(self) -> None:
        self.broken = True
        with suppress(OSError, ValueError):  # a stream without a descriptor (a test's capture): nothing to redirect
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def write(self, text: str) -> int:
        return self._guarded("write", text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guarded("flush")

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding...: the stream's own
        return getattr(self._stream, name)


@contextmanager
def console_survives_pipe() -> Iterator[None]:
    """stdout and stderr (and so every rich Console, which looks them up at each write) drop output once their
    pipe's reader has gone, for as long as the context lasts; the streams are put back after."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = SurvivesBrokenPipe(sys.stdout), SurvivesBrokenPipe(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


class StopRequest:
    """Context manager: `requested` turns True on the first SIGINT/SIGTERM."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        with suppress(OSError):  # under `| tee` the reader may be gone already: the stop must not depend on saying so
            print("\nstopping after this step and saving a checkpoint (Ctrl-C again to abandon the step)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class TerminateAsInterrupt:
    """Context manager: SIGTERM raises KeyboardInterrupt, as Ctrl-C does, where no StopRequest is active.

    Outside the step loop (setup, the reference evaluation, the final save) a SIGTERM then
    cleans up exactly like Ctrl-C: a run that never started is removed, one that did is told
    how to resume. Inside the loop `StopRequest` takes over and restores this on exit.
    """

    def __init__(self) -> None:
        self._previous: object = None

    @staticmethod
    def _handle(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> TerminateAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
