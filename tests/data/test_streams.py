"""One random stream per consumer: data order per epoch, truncation points and buffer draws per rank, splits."""

import itertools

import numpy as np

from sapo_lite.data.streams import STREAMS, random_stream


def draws(generator: np.random.Generator) -> tuple[int, ...]:
    return tuple(generator.integers(0, 2**62, 8).tolist())


def test_every_consumer_epoch_and_rank_draws_its_own_numbers():
    seed = 42
    streams = {("data_order", epoch): random_stream(seed, "data_order", epoch) for epoch in range(3)}
    for name in ("truncation", "buffer_draws"):
        streams.update({(name, rank): random_stream(seed, name, rank) for rank in range(2)})
    streams.update({(name,): random_stream(seed, name) for name in ("held_out", "validation")})
    seen = {key: draws(gen) for key, gen in streams.items()}
    for a, b in itertools.combinations(seen, 2):
        assert seen[a] != seen[b], (a, b)
    assert set(name for name, *_ in seen) == set(STREAMS)


def test_the_old_overlaps_are_gone():
    """Before: truncation points drew from default_rng(seed + 1), the very stream of the epoch-1 shuffle
    (default_rng(seed + epoch)); buffer draws from seed + 2, epoch 2's; the held-out split from epoch 0's."""
    seed = 42
    assert draws(np.random.default_rng(seed + 1)) == draws(np.random.default_rng(seed + 1))  # what the old code did
    assert draws(random_stream(seed, "truncation", 0)) != draws(random_stream(seed, "data_order", 1))
    assert draws(random_stream(seed, "buffer_draws", 0)) != draws(random_stream(seed, "data_order", 2))
    assert draws(random_stream(seed, "held_out")) != draws(random_stream(seed, "data_order", 0))


def test_streams_are_reproducible():
    assert draws(random_stream(7, "validation")) == draws(random_stream(7, "validation"))
    assert draws(random_stream(7, "validation")) != draws(random_stream(8, "validation"))
