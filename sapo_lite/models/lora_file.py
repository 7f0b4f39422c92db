"""A PEFT LoRA adapter folder read from disk: the one reader behind the folder merge, the GGUF export and
the `model.init_adapter` check.

Each base weight the adapter changes gets `scale * B @ A` in fp32, peft's `merge_and_unload` arithmetic,
optionally for a block of rows `[r0, r1)` only (the GGUF exporter streams a weight block by block; the
folder merge asks for whole weights). It reads everything plain peft adapters may carry beyond sapo-lite's
own, because a run may start from any adapter (`model.init_adapter`):

- the scale per module: `lora_alpha / r` (`/ sqrt(r)` with rsLoRA), with `alpha_pattern` matched as peft
  matches it and the rank taken from the stored A (what `rank_pattern` made it);
- embedding LoRA (`lora_embedding_A/B`, the delta transposed: [vocab, hidden]);
- `modules_to_save`: a whole trained module that replaces the base weight; likewise the copy of the
  embedding or head weight peft saves beside a LoRA on them (`...embed_tokens.base_layer.weight`).

What cannot be folded into plain weights (DoRA, a LoRA bias, GPT-2 style fan_in_fan_out) is refused in one
line. A tied output head is the caller's to place (`TIED_HEAD`): the adapter names `lm_head.weight`, the
checkpoint may hold only the embedding it shares.

The adapter names modules as transformers builds the model; a multimodal checkpoint (Gemma 3 4B-27B) is saved
in another layout (`language_model.model.layers.N` for the module `model.language_model.layers.N`,
`vision_tower` for `model.vision_tower`): `align_to` names the targets as the checkpoint does, `rename` as a
writer wants them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from .safetensors_io import TensorSource

# (embedding, output head) as the Llama-like families name them; tied, the head reads the embedding's tensor
TIED_HEAD = ("model.embed_tokens.weight", "lm_head.weight")
_PREFIX = "base_model.model."
# `...q_proj.lora_A.weight` (peft strips the adapter name on save) or `...q_proj.lora_A.default.weight`
_LINEAR_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# embeddings store bare parameters: `...embed_tokens.lora_embedding_A` (optionally `.default`)
_EMBED_KEY = re.compile(r"^(?P<module>.+)\.lora_embedding_(?P<ab>[AB])(?:\.[^.]+)?$")
_NOT_FOLDABLE = ("use_dora", "fan_in_fan_out", "lora_bias")
_SUBMODELS = ("model.vision_tower.", "model.multi_modal_projector.")  # saved without the leading `model.`


def layout_free(name: str) -> str:
    """A weight's name with transformers' two layouts of a multimodal model made one: `model.language_model.X`
    (the module) and `language_model.model.X` (the saved checkpoint) both become `model.X`."""
    name = name.replace("language_model.", "")
    return name.removeprefix("model.") if name.startswith(_SUBMODELS) else name


@dataclass
class LoraPair:
    """The A/B tensors of one adapted module and how to combine them."""

    a_key: str = ""
    b_key: str = ""
    embedding: bool = False
    rank: int = 0
    scale: float = 0.0


def pattern_value(patterns: Mapping[str, float], module: str, default: float) -> float:
    """peft's `rank_pattern`/`alpha_pattern` lookup (`get_pattern_key`): the first key that matches the end of
    the module's path, as a whole name or a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`)."""

    def __init__(self, adapter_dir: Path) -> None:
        adapter_dir = Path(adapter_dir)
        config_file, weights_file = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise ModelError(
                f"`{adapter_dir}` is not a PEFT adapter folder (needs adapter_config.json + adapter_model.safetensors)",
                "point at a folder such as RUN/adapters/policy; a run's folder that lacks them: train or resume it",
            )
        self.folder = adapter_dir
        self.config = json.loads(config_file.read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise ModelError(f"`{adapter_dir}` is a {self.config.get('peft_type')} adapter; only LoRA is supported")
        unfoldable = [key for key in _NOT_FOLDABLE if self.config.get(key)]
        if unfoldable:
            raise ModelError(
                f"`{adapter_dir}` uses {', '.join(unfoldable)}, which cannot be folded into plain weights here",
                "load it with peft and call merge_and_unload(), then save that model",
            )
        self.source = TensorSource([weights_file])
        self.pairs: dict[str, LoraPair] = {}  # base weight name -> LoRA pair
        self.replacements: dict[str, str] = {}  # base weight name -> adapter key (modules_to_save)
        for key in self.source.entries:
            name = key.removeprefix(_PREFIX)
            match = _LINEAR_KEY.match(name) or _EMBED_KEY.match(name)
            if match is None:  # a whole weight: `modules_to_save`, or the embedding/head copy peft saves beside
                # a LoRA on them (`save_embedding_layers`; it loads that into the base before the LoRA applies)
                self.replacements[name.replace(".modules_to_save.default", "").replace(".base_layer.", ".")] = key
                continue
            pair = self.pairs.setdefault(match["module"] + ".weight", LoraPair())
            pair.embedding = "lora_embedding_" in name
            setattr(pair, "a_key" if match["ab"] == "A" else "b_key", key)
        alpha, rslora = float(self.config.get("lora_alpha", 8)), bool(self.config.get("use_rslora", False))
        alpha_pattern = self.config.get("alpha_pattern") or {}
        for base_name, pair in self.pairs.items():
            if not pair.a_key or not pair.b_key:
                self.close()
                raise ModelError(f"`{adapter_dir}` has only one of lora_A/lora_B for {base_name}",
                                 "re-save the adapter")
            pair.rank = self.source.entries[pair.a_key].shape[0]  # the stored shape is the truth (rank_pattern)
            module_alpha = pattern_value(alpha_pattern, base_name.removesuffix(".weight"), alpha)
            pair.scale = module_alpha / (math.sqrt(pair.rank) if rslora else pair.rank)
        self._cache: tuple[str, torch.Tensor, torch.Tensor] | None = None

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the adapter file."""
        self.source.close()

    @property
    def targets(self) -> set[str]:
        """Every base weight the adapter changes."""
        return {*self.pairs, *self.replacements}

    def changes_tied_pair(self) -> bool:
        """Whether the adapter touches the embedding or the output head: tied, the two must then be split."""
        return any(name in self.targets for name in TIED_HEAD)

    def rename(self, new_name: Callable[[str], str | None]) -> None:
        """Name every target `new_name(name)`; a target it maps to None is dropped (not written)."""
        self.pairs = {new: pair for name, pair in self.pairs.items() if (new := new_name(name)) is not None}
        self.replacements = {new: key for name, key in self.replacements.items()
                             if (new := new_name(name)) is not None}
        self._cache = None

    def align_to(self, checkpoint_names: Collection[str]) -> None:
        """Name targets the checkpoint lacks as the checkpoint's weight of the same module in the other layout
        (`layout_free`); the rest stay as they are, for `check_against` to report."""
        saved = {layout_free(name): name for name in checkpoint_names}
        self.rename(lambda name: name if name in checkpoint_names else saved.get(layout_free(name), name))

    def check_against(self, shapes: Mapping[str, Sequence[int]], fix: str) -> None:
        """Every target exists in the base with the shape the adapter was made for; `fix` is the hint."""
        missing = sorted(n for n in self.targets if n not in shapes)
        if missing:
            raise ModelError(f"`{self.folder}` does not match the base model: {len(missing)} adapter target(s) "
                             f"not in the base, e.g. {missing[0]}", fix)
        for name, pair in self.pairs.items():
            a, b, w = self.source.entries[pair.a_key].shape, self.source.entries[pair.b_key].shape, shapes[name]
            # linear: A [r, in], B [out, r], W [out, in]; embedding: A [r, vocab], B [hidden, r], W [vocab, hidden]
            expect = (b[0], a[1]) if not pair.embedding else (a[1], b[0])
            if len(w) != 2 or tuple(w) != expect or a[0] != b[1]:
                raise ModelError(f"`{self.folder}` does not match the base model: {name} is {list(w)} but LoRA "
                                 f"A{list(a)}/B{list(b)}", fix)
        for name, key in self.replacements.items():
            if tuple(self.source.entries[key].shape) != tuple(shapes[name]):
                raise ModelError(f"`{self.folder}` does not match the base model: saved module {name} has shape "
                                 f"{list(self.source.entries[key].shape)}, base has {list(shapes[name])}", fix)

    def replacement(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor | None:
        """Rows of a fully trained module (`modules_to_save`) that replaces the base weight, if any."""
        key = self.replacements.get(name)
        return None if key is None else self.source.read(key, row_start, row_end)

    def delta(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor | None:
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
