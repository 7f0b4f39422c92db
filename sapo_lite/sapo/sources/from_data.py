"""`sapo.pairs=data`: offline DPO/ORPO on the data's own (chosen, rejected) pairs; nothing is generated.

The paper's DPO and ORPO baselines. The pairs go through the same buffer as SAPO's (FIFO, draws
weighted 1 / (1 + times drawn)), so the two are trained by one engine with the same number of new
examples a step; TRL's DPOTrainer instead walks the dataset in shuffled epochs. The loss on a pair
equals TRL's (tests/sapo/test_pair_sources.py checks one step's DPO loss against DPOTrainer's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ...config.schema import Config
from ..augment import FROM_DATA, Pair
from . import MadePairs, PairSource, SourceContext


class DataPairs(PairSource):
    generates = False
    reads_rejected = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        return MadePairs(data_pairs(examples), {"pairs/identical": math.nan})


def data_pairs(examples: Sequence[Any]) -> list[Pair]:
    """Each example's chosen and the data's rejected response after the same prompt (trunc_point 0, no segment)."""
    return [
        Pair(np.concatenate([ex.prompt_ids, ex.response_ids]).astype(np.int32),
             np.concatenate([ex.prompt_ids, ex.rejected_ids]).astype(np.int32), len(ex.prompt_ids), 0, 0, FROM_DATA)
        for ex in examples
    ]
