"""One module per model family, each a small class naming where llama.cpp's converter treats it differently
(its `conversion/<family>.py`); `base.py` holds what they share. `FAMILIES` maps a config's architecture to
its family: an architecture missing here is refused, with the supported list and llama.cpp's own command.
"""

from __future__ import annotations

from .base import CONVERTER, Family, ModelSpec, convert_instead
from .gemma import Gemma3
from .llama import Llama
from .phi import Phi3
from .qwen import Qwen2, Qwen3

FAMILIES: dict[str, Family] = {arch: family for family in (Llama(), Qwen2(), Qwen3(), Gemma3(), Phi3())
                               for arch in family.hf_archs}

__all__ = ["CONVERTER", "FAMILIES", "Family", "ModelSpec", "convert_instead"]
