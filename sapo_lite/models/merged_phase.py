"""The EMA adapter merged into the base weights for a generation phase, the originals back after it.

Unmerged, every adapted projection of every decode step costs two extra small matmuls (x @ A^T,
then @ B^T); merged, decoding reads one weight matrix per projection, as the plain model does
(SmolLM2 fp32, batch 4: 1.3x the decode tokens/s of the unmerged lean loop, bench/generation.py).

`with MergedAdapter(model, EMA):` computes W + scaling * B @ A for each adapted layer into a
scratch tensor and points the layer's weight at it; peft is told the adapter is merged, so it
skips the LoRA branch (and the lean loop's plan sees a plain weight). On exit every weight points
at its original tensor again. The originals are never written, so they come back bit-identical,
however many phases a run has, also when the phase ends with an exception; merging in place and
subtracting afterwards would leave rounding residue in the base after every step.

Only float bases are merged: merging into NF4 weights would re-round them (the one 4-bit base serves
every role), so a quantised layer keeps its adapter unmerged. The scratch tensors (one copy of every adapted
weight, 425 MB for SmolLM2 fp32) are kept between phases: allocating them afresh costs more than
the merge itself.
"""

from __future__ import annotations

from types import TracebackType

import torch
from torch import nn


class MergedAdapter:
    """Context manager: `adapter` (the only active one) merged into scratch copies of the base weights."""

    def __init__(self, model: nn.Module, adapter: str) -> None:
        self.model, self.adapter = model, adapter
        self._scratch: dict[tuple[str, int], torch.Tensor] = {}  # kept between phases
        self._swapped: list[tuple[nn.Module, nn.Parameter, torch.Tensor]] = []

    def mergeable_layers(self) -> list[nn.Module]:
        """peft LoRA layers holding `adapter` as a plain LoRA on a float nn.Linear, not merged yet."""
        layers = []
        for module in self.model.modules():
            if not (hasattr(module, "lora_A") and hasattr(module, "base_layer")) or self.adapter not in module.lora_A:
                continue
            plain_lora = (self.adapter not in (getattr(module, "lora_variant", None) or {})
                          and not getattr(module, "fan_in_fan_out", False)
                          and module.lora_B[self.adapter].bias is None)
            if plain_lora and not module.merged and type(module.get_base_layer()) is nn.Linear:
                layers.append(module)
        return layers

    def scratch_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._scratch.values())

    @torch.no_grad()
    def __enter__(self) -> MergedAdapter:
        try:
            layers = self.mergeable_layers()
            scratch = self._scratch_views(layers)
            for layer in layers:
                if list(layer.active_adapters) != [self.adapter]:
                    raise RuntimeError(f"merging adapter `{self.adapter}` needs it to be the only active one "
                                       f"(active: {list(layer.active_adapters)})")
                weight = layer.get_base_layer().weight
                a = layer.lora_A[self.adapter].weight.to(weight.dtype)
                b = layer.lora_B[self.adapter].weight.to(weight.dtype)
                # W + s * B @ A in one addmm; W itself is only read
                torch.addmm(weight.data, b, a, alpha=float(layer.scaling[self.adapter]), out=scratch[id(layer)])
                self._swapped.append((layer, weight, weight.data))
                weight.data = scratch[id(layer)]
                layer.merged_adapters.append(self.adapter)
        except BaseException:
            self._restore()
            raise
        return self

    def _scratch_views(self, layers: list[nn.Module]) -> dict[int, torch.Tensor]:
        """Per layer a scratch tensor laid out as its base weight: where the weights of several layers
        fill one buffer together (q/k/v side by side, `weight_layout.py`), views of one scratch buffer
        of the same shape, so the merged weights lie side by side too; else a tensor of its own."""
        by_storage: dict[int, list[torch.Tensor]] = {}
        for layer in layers:
            weight = layer.get_base_layer().weight.data
            by_storage.setdefault(weight.untyped_storage().data_ptr(), []).append(weight)
        views: dict[int, torch.Tensor] = {}
        for layer in layers:
            weight = layer.get_base_layer().weight.data
            storage = weight.untyped_storage()
            sharing = by_storage[storage.data_ptr()]
            if len(sharing) > 1 and sum(w.numel() for w in sharing) * weight.element_size() == storage.nbytes():
                flat = self._kept(("buffer", storage.data_ptr()), storage.nbytes() // weight.element_size(), weight)
                views[id(layer)] = flat.as_strided(weight.shape, weight.stride(), weight.storage_offset())
            else:
                kept = self._scratch.get(("layer", id(layer)))
                if kept is None or kept.shape != weight.shape or kept.dtype != weight.dtype:
                    kept = self._scratch["layer", id(layer)] = torch.empty_like(weight)  # its strides too
                views[id(layer)] = kept
        return views

    def _kept(self, key: tuple[str, int], numel: int, like: torch.Tensor) -> torch.Tensor:
        flat = self._scratch.get(key)
        if flat is None or flat.numel() != numel or flat.dtype != like.dtype:
            flat = self._scratch[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return flat

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._restore()

    def _restore(self) -> None:
        while self._swapped:
            layer, weight, original = self._swapped.pop()
            weight.data = original
            if self.adapter in layer.merged_adapters:
                layer.merged_adapters.remove(self.adapter)
