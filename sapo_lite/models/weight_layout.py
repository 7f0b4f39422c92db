"""Full-precision CPU weights stored transposed: the same values and shapes, read faster when decoding.

A decode step multiplies a few rows by every weight, so its speed is how fast the weights stream
from memory. oneDNN's small-batch linear (`matmul.py`) streams a weight stored as [in, out] (a
`.t()` view of a contiguous [in, out] tensor) much closer to the memory bandwidth than one stored as
torch's usual [out, in]: SmolLM2-135M fp32, batch 4, the matmuls of a decode step timed alone,
24.9 GB/s against 16.6 at 1 thread and 37.9 against 28.8 at 2 (this machine copies memory at about
40 GB/s); the whole decode step gains less (bench/generation.py). For batches of hundreds of rows
(training, prefill) the layouts run at the same speed, and `F.linear` (MKL) accepts any of them
without a copy.

So a CPU base in fp32 gets every frozen `nn.Linear` weight re-stored once at load: each tensor keeps
its shape [out, in] and its values, only the memory order changes. The projections that read the same
input (q/k/v, gate/up) go side by side into one [in, q+k+v] buffer, so the decode loop reads them
with one wide matmul instead of three narrow ones (`side_by_side`). The output head stays as it is
where the decode loop reads oneDNN's packed copy of it (`matmul.packed_copy`, faster still); so does a
tied embedding with it, whose rows a lookup then reads contiguously (from the transposed table,
512 tokens took 0.8-2.2 ms instead of 0.02-0.1). An NF4 base keeps its 4-bit layers as they are
(bitsandbytes' own type). Skipped where the matmuls do not take the oneDNN route (CUDA, bf16/fp16, a
torch without oneDNN): nothing to gain.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .matmul import onednn_usable, packing_usable

SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama-style names


def store_transposed_for_decoding(model: nn.Module) -> int:
    """Re-store the frozen fp32 `nn.Linear` weights of a CPU `model` as [in, out]; the number of tensors
    given memory of their own (the re-stored weights and, with them, every other tensor of the model)."""
    if not onednn_usable():
        return 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    packed_head = {id(head.weight)} if head is not None and packing_usable() else set()
    stored: set[int] = set()
    for module in model.modules():
        for names in SHARED_INPUT:
            linears = [getattr(module, name, None) for name in names]
            if all(_restorable(linear) for linear in linears) and len({lin.in_features for lin in linears}) == 1:
                _store_side_by_side([linear.weight for linear in linears])
                stored.update(id(linear.weight) for linear in linears)
    for module in model.modules():
        if _restorable(module) and id(module.weight) not in stored | packed_head:
            module.weight.data = module.weight.data.t().contiguous().t()
            stored.add(id(module.weight))
    if stored:
        _own_memory_for_the_rest(model, stored)
    return len(stored)


def _own_memory_for_the_rest(model: nn.Module, stored: set[int]) -> None:
    """Every other CPU tensor of the model copied out of the file it was loaded from. transformers maps a
    safetensors file into memory and its tensors read from that map; the copies above read every page of
    it once, and while one tensor (a norm weight) still points into the map, those pages stay resident
    beside the copies: +0.54 GB resident for SmolLM2 fp32. Small: norms, biases, an untied embedding."""
    for tensor in [*model.parameters(), *model.buffers()]:
        # exact types: bitsandbytes' 4-bit parameters (a subclass) were quantised into memory of their own
        if id(tensor) not in stored and tensor.device.type == "cpu" and type(tensor) in (nn.Parameter, torch.Tensor):
            stored.add(id(tensor))
            tensor.data = tensor.data.clone()


def _restorable(module: object) -> bool:
    if type(module) is not nn.Linear:  # bitsandbytes' Linear4bit and peft's LoRA layers are other types
        return False
    weight = module.weight
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and not weight.requires_grad
            and weight.is_contiguous())  # not contiguous: re-stored already (a tied head)


def _store_side_by_side(weights: Sequence[nn.Parameter]) -> None:
    columns = torch.empty(weights[0].shape[1], sum(w.shape[0] for w in weights), dtype=weights[0].dtype)
    start = 0
    for weight in weights:
        block = columns[:, start : start + weight.shape[0]]
        block.copy_(weight.data.t())
        weight.data = block.t()
        start += weight.shape[0]


def side_by_side(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The [sum of outs, in] weight the `weights` make together when they are the column blocks, in order,
    of one contiguous [in, sum of outs] buffer (as stored above, or a merged copy of it); else None."""
    if len(weights) < 2:
        return None
    first, width = weights[0], sum(w.shape[0] for w in weights)
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for weight in weights:
        if (weight.dim() != 2 or weight.shape[1] != first.shape[1] or weight.stride() != (1, width)
                or weight.dtype != first.dtype or weight.untyped_storage().data_ptr() != storage
                or weight.storage_offset() != offset):
            return None
        offset += weight.shape[0]
    return first.as_strided((width, first.shape[1]), (1, width), first.storage_offset())
