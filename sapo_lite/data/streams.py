"""Random streams, one per consumer: no two draw from the same bit stream.

Each consumer gets `numpy.random.default_rng([seed, STREAM_ID, *keys])`, a SeedSequence of its
own: the data order of each epoch, the EMA's truncation points and the buffer's draws (one
stream per rank), the held-out and validation splits. Seeding consumers `seed + 1`, `seed + 2`
instead made the truncation points the same bit stream as the epoch-1 shuffle and the buffer
draws the epoch-2 shuffle's, and the held-out split reused epoch 0's order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")

STREAMS = {"data_order": 1, "truncation": 2, "buffer_draws": 3, "held_out": 4, "validation": 5}


def random_stream(seed: int, name: str, *keys: int) -> np.random.Generator:
    """The generator of consumer `name` (see STREAMS), further keyed by epoch, rank, ..."""
    return np.random.default_rng([seed, STREAMS[name], *keys])


def set_aside(items: Sequence[T], count: int, seed: int, name: str) -> tuple[list[T], list[T]]:
    """(kept, set aside): `count` items drawn by stream `name`, both lists in their original order.

    The one split of the data: the held-out set (`held_out`) and the validation split (`validation`)
    are both drawn here, each from its own stream."""
    chosen = set(random_stream(seed, name).permutation(len(items))[:count].tolist()) if count > 0 else set()
    return [x for i, x in enumerate(items) if i not in chosen], [x for i, x in enumerate(items) if i in chosen]
