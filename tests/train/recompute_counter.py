"""Count the decoder-layer forwards that autograd recomputes in backward: activation checkpointing at work.

A forward pre-hook on the first module inside every decoder layer (transformers checkpoints the
layer's `forward`, so hooks on the layer itself never see the recompute) counts the calls made
while the autograd engine runs a backward pass (`torch._C._current_graph_task_id() != -1`): with
checkpointing, each layer of each training forward runs once more there; without it, never.
`install(path)` wraps the trainer's adapter setup (to hook the model it builds) and its step
record (to write each step's count as a JSON line `{"step": N, "recomputed": K}` to `path`).

In a test: `install(path)` in-process. Under torchrun, as a script that runs the CLI:

    torchrun --nproc_per_node 2 tests/train/recompute_counter.py COUNTS_DIR train --preset tiny ...

(each rank writes COUNTS_DIR/recomputed-rankK.jsonl).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

_count = {"recomputed": 0}


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _count_hook(module, args) -> None:
    if _in_backward():
        _count["recomputed"] += 1


def install(path: Path, patch=setattr) -> None:
    """Hook every model the trainer sets up, and append each optimizer step's count to `path`.

    `patch` sets the wrapped functions: a test passes `monkeypatch.setattr`, so they are undone after it.
    """
    from sapo_lite.train import loop, session

    _count["recomputed"] = 0
    real_attach, real_record = session.attach_adapters, loop._step_record

    def attach_and_hook(*args, **kwargs):
        model = real_attach(*args, **kwargs)
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                next(module.children()).register_forward_pre_hook(_count_hook)
        return model

    def record_and_count(session_, buffer, step, *args, **kwargs):
        with Path(path).open("a") as handle:
            handle.write(json.dumps({"step": step, "recomputed": _count["recomputed"]}) + "\n")
        _count["recomputed"] = 0
        return real_record(session_, buffer, step, *args, **kwargs)

    patch(session, "attach_adapters", attach_and_hook)
    patch(loop, "_step_record", record_and_count)


def read_counts(path: Path) -> dict[int, int]:
    """step -> recomputed layer calls in that step's policy update (a resumed step's count replaces the killed one)."""
    return {r["step"]: r["recomputed"] for r in map(json.loads, Path(path).read_text().splitlines())}


if __name__ == "__main__":
    counts_dir = Path(sys.argv[1])
    install(counts_dir / f"recomputed-rank{os.environ.get('RANK', '0')}.jsonl")
    from sapo_lite.cli import app

    app(sys.argv[2:])
