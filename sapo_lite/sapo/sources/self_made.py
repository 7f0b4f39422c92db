"""`sapo.pairs=self`, SAPO itself: the EMA rewrites a segment of each chosen response (augment.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

from ...config.schema import Config
from ...models.roles import EMA, acting_as
from ..augment import NewPairs, self_augment
from . import MadePairs, PairSource, SourceContext


class EmaRewrites(PairSource):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        new = rewrite(ctx, examples)
        return MadePairs(new.pairs, {"pairs/identical": new.identical / max(len(examples), 1)})


def rewrite(ctx: SourceContext, examples: Sequence[Any]) -> NewPairs:
    """The EMA's rewrites of `examples`: merged for the whole round where that applies (resampled rewrites too),
    the base weights back exactly after it; the idle cores' threads from the merge on."""
    s = ctx.cfg.sapo
    with acting_as(ctx.model, EMA), ctx.generating(), ctx.merged_ema or contextlib.nullcontext():
        return self_augment(
            ctx.model, examples, s.segment_len, ctx.cfg.data.max_len, ctx.pad_id, ctx.stop_ids, ctx.rng,
            s.gen_batch_size, ctx.sampling(), s.static_cache, s.decoder, short_rewrite=s.short_rewrite,
            identical=s.identical, buffer_empty=ctx.buffer_empty,
        )
