"""Ctrl-C and SIGTERM finish the current step, save a checkpoint and exit cleanly.

A second Ctrl-C abandons the step at once; the newest complete checkpoint is then where
`--resume` continues.
"""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType


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
