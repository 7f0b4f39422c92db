"""`sapo.pairs=mix`: each step's new pairs part the data's, part the EMA's rewrites, through one buffer.

Of a step's n new examples, floor(share * n) take the data's rejected answer, and one more with
probability frac(share * n) (so the share holds on average at any n); which ones is a seeded draw from
the truncation stream, saved in every checkpoint, so a resumed run mixes the same way. The rest are
rewritten by the EMA as in `self`. Both kinds enter the same FIFO buffer in the same step, each
marked with its origin, so training draws them in proportion to how many are there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...config.schema import Config
from ..augment import EMA_REWRITE, FROM_DATA
from . import MadePairs, PairSource, SourceContext
from .from_data import data_pairs
from .self_made import rewrite


class MixedPairs(PairSource):
    reads_rejected = True
    origins = (FROM_DATA, EMA_REWRITE)

    def __init__(self, cfg: Config) -> None:
        self.share = cfg.sapo.mix_share

    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        from_data = choose_from_data(len(examples), self.share, ctx.rng)
        data_examples = [ex for i, ex in enumerate(examples) if i in from_data]
        ema_examples = [ex for i, ex in enumerate(examples) if i not in from_data]
        new = rewrite(ctx, ema_examples) if ema_examples else None
        pairs = data_pairs(data_examples) + (new.pairs if new else [])
        figures = {"pairs/identical": new.identical / len(ema_examples) if new else math.nan,
                   "pairs/from_data": len(data_examples) / max(len(pairs), 1)}
        return MadePairs(pairs, figures)


def choose_from_data(count: int, share: float, rng: np.random.Generator) -> set[int]:
    """Which of `count` examples take the data's rejected answer: share * count of them, rounded at random."""
    exact = share * count
    n = math.floor(exact) + int(rng.random() < exact - math.floor(exact))
    return set(rng.permutation(count)[:n].tolist())
