"""Where each step's rejected responses come from: one module per `sapo.pairs` mode, one registry.

    self   self_made.py  the EMA rewrites a segment of each chosen response (SAPO; the default)
    data   from_data.py  the data's own rejected answers: offline DPO/ORPO, nothing generated
    mix    mixed.py      part the data's, part the EMA's, `sapo.mix_share` of them the data's
    spin   spin.py       a whole answer written from the prompt by the previous iterate (SPIN)

A loss that trains on the chosen responses alone (SFT) takes `ChosenOnly` whatever the mode.
Every source returns its pairs marked with their origin (augment.py's ORIGINS), which the buffer
stores; the loop knows none of them by name (`pair_source`).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ...config.schema import Config
from ..augment import Pair, chosen_only_pairs
from ..losses import LOSSES


@dataclass
class SourceContext:
    """What a source may use to make one step's pairs; built by the loop."""

    model: Any
    cfg: Config
    pad_id: int
    stop_ids: list[int]
    rng: np.random.Generator
    """The truncation stream: cut points, the mix's draw; saved in every checkpoint."""
    generating: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    """Around every generation: the idle cores' threads on the CPU."""
    merged_ema: Any = None
    """The EMA merged into scratch weights for its generation (models/merged_phase.py), or None."""
    buffer_empty: bool = False

    def sampling(self) -> dict[str, float]:
        s = self.cfg.sapo
        return {"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p}


@dataclass
class MadePairs:
    """One step's new pairs and the figures about them for metrics.jsonl."""

    pairs: list[Pair]
    figures: dict[str, float] = field(default_factory=dict)


class PairSource(ABC):
    """A mode of `sapo.pairs`. `generates`: it runs a generator (so it has a generation share);
    `reads_rejected`: the data must hold preference pairs; `at_step_start` runs before the step's pairs."""

    generates = True
    reads_rejected = False
    origins: tuple[str, ...] = ()
    """The origins a run of this source mixes in its buffer, reported apart in metrics.jsonl; () for one."""

    @abstractmethod
    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        """This step's new pairs for `examples` (each mode's own module says how it makes them)."""

    def at_step_start(self, model: Any, buffer: Any, step: int) -> None:
        """Before the step's pairs (after the EMA update): a source whose reference changes acts here."""
        return None  # most sources: nothing to do


class ChosenOnly(PairSource):
    """Pairs with an empty rejected response for a loss that needs none (SFT)."""

    generates = False

    def make(self, ctx: SourceContext, examples: Sequence[Any]) -> MadePairs:
        pairs = chosen_only_pairs(examples)
        return MadePairs(pairs, {"pairs/identical": math.nan, "pairs/cut_off": math.nan})


def pair_source(cfg: Config) -> PairSource:
    """The source a run's config asks for."""
    from .from_data import DataPairs
    from .mixed import MixedPairs
    from .self_made import EmaRewrites
    from .spin import SpinAnswers

    if not LOSSES[cfg.loss.name].needs_rejected:
        return ChosenOnly()
    sources: dict[str, type[PairSource]] = {"self": EmaRewrites, "data": DataPairs, "mix": MixedPairs,
                                            "spin": SpinAnswers}
    return sources[cfg.sapo.pairs](cfg)


def reads_rejected(cfg: Config) -> bool:
    """Whether the run trains on the data's rejected answers (so the data must hold them)."""
    return LOSSES[cfg.loss.name].needs_rejected and cfg.sapo.pairs in ("data", "mix")
