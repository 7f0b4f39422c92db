"""The model families sapo-lite knows, one file each (`base.py` says what a family is)."""

from __future__ import annotations

from typing import Any

from .base import ChatMarkers, Family, LayerModules
from .gemma3 import Gemma3
from .llama import Llama
from .mistral import Mistral
from .phi3 import Phi3
from .qwen2 import Qwen2
from .qwen3 import Qwen3

FAMILIES: dict[str, Family] = {f.name: f for f in (Llama(), Qwen2(), Qwen3(), Gemma3(), Phi3(), Mistral())}
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES.values() for t in (f.model_type, *f.aliases)}


def family_of(config: Any) -> Family | None:
    """The family of a transformers config (by `model_type`), None for one sapo-lite does not know."""
    return BY_MODEL_TYPE.get(getattr(config, "model_type", None))


__all__ = ["BY_MODEL_TYPE", "FAMILIES", "ChatMarkers", "Family", "LayerModules", "family_of"]
