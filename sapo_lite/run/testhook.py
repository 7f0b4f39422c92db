"""A test hook, and nothing else: pause a run at a named phase so a test can kill it exactly there.

Tests and `bench/faults.py` set `SAPO_TEST_PAUSE_AT=<phase>[:<n>]` (the n-th time the phase is
reached, default 1) and `SAPO_TEST_PAUSE_FILE=<path>`. At that point the process writes its pid
into the file and waits while the file exists: a test SIGKILLs it there, or deletes the file to
let it run on (and kill it a random moment later). Unset, `pause_point` costs one dict lookup.

Phases: startup, generation, reference, buffer-write, training, checkpoint-write,
checkpoint-rotate, best-save, final-save, final-eval, summary.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

_reached: Counter[str] = Counter()


def pause_point(phase: str) -> None:
    target = os.environ.get("SAPO_TEST_PAUSE_AT")
    if not target:
        return
    name, _, nth = target.partition(":")
    if name != phase:
        return
    _reached[phase] += 1
    if _reached[phase] != int(nth or 1):
        return
    marker = Path(os.environ["SAPO_TEST_PAUSE_FILE"])
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(marker)  # the test sees the file complete or not at all
    while marker.exists():
        time.sleep(0.01)
