"""Random streams, one per consumer: no two draw from the same bit stream.

Each consumer gets `numpy.random.default_rng([seed, STREAM_ID, *keys])`, a SeedSequence of its
own: the data order of each epoch, the EMA's truncation points and the buffer's draws (one
stream per rank), the held-out and validation splits. Seeding consumers `seed + 1`, `seed + 2`
instead made the truncation points the same bit stream as the epoch-1 shuffle and the buffer
draws the epoch-2 shuffle's, and the held-out split reused epoch 0's order.
"""

from __future__ import annotations

import numpy as np

STREAMS = {"data_order": 1, "truncation": 2, "buffer_draws": 3, "held_out": 4, "validation": 5}


def random_stream(seed: int, name: str, *keys: int) -> np.random.Generator:
    """The generator of consumer `name` (see STREAMS), further keyed by epoch, rank, ..."""
    return np.random.default_rng([seed, STREAMS[name], *keys])
