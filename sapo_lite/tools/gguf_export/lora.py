"""Fold a PEFT LoRA adapter into base weights on the fly, one block of rows at a time.

The merge is `W' = W + scale * B @ A` in fp32 (`scale = lora_alpha / r`, or `lora_alpha / sqrt(r)`
with rsLoRA), peft's `merge_and_unload` arithmetic without ever holding the merged model: the
exporter asks for the delta of rows `[r0, r1)` of one weight while it streams that weight to the
GGUF file. tools/merge.py reads adapters too, whole, for the folder output; this reader also
handles what plain peft adapters may carry beyond sapo-lite's own (rank and alpha patterns,
`modules_to_save`, embedding LoRA), because a run may start from any adapter (`model.init_adapter`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ExportError
from .safetensors_io import TensorEntry, TensorSource

_PREFIX = "base_model.model."
# `...q_proj.lora_A.weight` (peft strips the adapter name on save) or `...q_proj.lora_A.default.weight`
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# embeddings store bare parameters: `...embed_tokens.lora_embedding_A` (optionally `.default`)
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")


@dataclass
class _LoraPair:
    """The A/B tensors of one adapted module and how to combine them."""

    a_key: str = ""
    b_key: str = ""
    embedding: bool = False
    scale: float = 0.0


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """peft's `rank_pattern`/`alpha_pattern` lookup: a key matches a module path ending in `.key`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""

    def __init__(self, adapter_dir: Path) -> None:
        config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ExportError(
                f"{adapter_dir} is not a PEFT adapter folder (needs adapter_config.json + adapter_model.safetensors)",
                "the run's adapter folder is incomplete: train or resume the run again",
            )
        config = json.loads(config_file.read_text())
        if config.get("peft_type", "LORA") != "LORA":
            raise ExportError(f"adapter type {config.get('peft_type')} is not supported, only LORA")
        if config.get("use_dora") or config.get("fan_in_fan_out") or config.get("lora_bias"):
            raise ExportError(
                "adapter uses DoRA, fan_in_fan_out or lora_bias, which this exporter cannot fold in",
                "merge it with peft's merge_and_unload(), save that and convert it with llama.cpp's "
                "convert_hf_to_gguf.py",
            )
        self.source = TensorSource([weights_file])
        self.pairs: dict[str, _LoraPair] = {}  # base weight name -> LoRA pair
        self.replacements: dict[str, str] = {}  # base weight name -> adapter key (modules_to_save)
        for key in self.source.entries:
            name = key.removeprefix(_PREFIX)
            match = _LINEAR_KEY.match(name) or _EMBED_KEY.match(name)
            if match is None:
                self.replacements[name.replace(".modules_to_save.default", "")] = key
                continue
            pair = self.pairs.setdefault(match["module"] + ".weight", _LoraPair())
            pair.embedding = "lora_embedding_" in name
            setattr(pair, "a_key" if match["ab"] == "A" else "b_key", key)
        alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
        for base_name, pair in self.pairs.items():
            if not pair.a_key or not pair.b_key:
                raise ExportError(f"adapter has only one of lora_A/lora_B for {base_name}", "re-save the adapter")
            rank = self.source.entries[pair.a_key].shape[0]  # the stored shape is the truth, whatever rank_pattern says
            module_alpha = _pattern_value(config.get("alpha_pattern") or {}, base_name[: -len(".weight")], alpha)
            pair.scale = module_alpha / (math.sqrt(rank) if rslora else rank)
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def close(self) -> None:
        """Release the adapter file."""
        self.source.close()

    def retarget_tied_head(self, embed_name: str, head_name: str) -> None:
        """With tied embeddings, `lm_head` *is* the embedding matrix (peft's merge edits both), so fold there."""
        if head_name in self.pairs and embed_name not in self.pairs:
            self.pairs[embed_name] = self.pairs.pop(head_name)
        if head_name in self.replacements and embed_name not in self.replacements:
            self.replacements[embed_name] = self.replacements.pop(head_name)

    def validate(self, base: dict[str, TensorEntry]) -> None:
        """Check every adapter tensor against the base *before* anything is written, so a mismatch leaves no file."""
        missing = [n for n in [*self.pairs, *self.replacements] if n not in base]
        if missing:
            raise ExportError(
                f"adapter does not match the base model: {len(missing)} target(s) not in the base, e.g. {missing[0]}",
                "export with the base model the adapter was trained on",
            )
        for name, pair in self.pairs.items():
            a, b, w = (self.source.entries[pair.a_key].shape, self.source.entries[pair.b_key].shape, base[name].shape)
            # linear: A [r, in], B [out, r], W [out, in]; embedding: A [r, vocab], B [hidden, r], W [vocab, hidden]
            expect = (b[0], a[1]) if not pair.embedding else (a[1], b[0])
            if len(w) != 2 or tuple(w) != expect or a[0] != b[1]:
                raise ExportError(
                    f"adapter does not match the base model: {name} is {list(w)} but LoRA A{list(a)}/B{list(b)}",
                    "export with the base model the adapter was trained on",
                )
        for name, key in self.replacements.items():
            if self.source.entries[key].shape != base[name].shape:
                raise ExportError(
                    f"adapter does not match the base model: saved module {name} has shape "
                    f"{list(self.source.entries[key].shape)}, base has {list(base[name].shape)}",
                    "export with the base model the adapter was trained on",
                )

    def replacement(self, name: str, row_start: int, row_end: int) -> torch.Tensor | None:
        """Rows of a fully trained module (`modules_to_save`) that replaces the base weight, if any."""
        key = self.replacements.get(name)
        return None if key is None else self.source.read(key, row_start, row_end)

    def delta(self, name: str, row_start: int, row_end: int) -> torch.Tensor | None:
        """fp32 `scale * B @ A` restricted to rows `[row_start, row_end)` of weight `name`, or None."""
        pair = self.pairs.get(name)
        if pair is None:
            return None
        if self._cache is None or self._cache[0] != name:  # a weight is streamed in many row blocks; read A/B once
            a = self.source.read(pair.a_key).to(torch.float32)
            b = self.source.read(pair.b_key).to(torch.float32)
            self._cache = (name, a, b)
        _, a, b = self._cache
        if pair.embedding:
            return pair.scale * (a[:, row_start:row_end].T @ b.T)
        return pair.scale * (b[row_start:row_end] @ a)
