"""Llama 3.x, Mistral (Nemo too) and SmolLM2: the converter's `LlamaModel`.

- Q/K rows are permuted: HF checkpoints store them for "rotate half" RoPE, llama.cpp's LLAMA graph rotates
  interleaved pairs;
- `vocab_size` and the RoPE dimension count (head_dim, which Mistral-Nemo sets to 128 != 5120/32) are written;
- Llama 3.1's `llama3` RoPE scaling is no key but a `rope_freqs` tensor of per-frequency factors.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from .base import Family, ModelSpec


class Llama(Family):
    arch = gguf.MODEL_ARCH.LLAMA
    hf_archs = ("LlamaForCausalLM", "MistralForCausalLM")
    rope_types = (*Family.rope_types, "llama3")

    def add_hparams(self, writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
        super().add_hparams(writer, spec)
        writer.add_vocab_size(spec.config["vocab_size"])
        writer.add_rope_dimension_count(spec.head_dim)

    def permuted_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return spec.n_head
        if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            return spec.n_head_kv
        return None

    def extra_tensors(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        if spec.rope_type != "llama3":
            return {}
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": llama3_rope_factors(spec)}


def llama3_rope_factors(spec: ModelSpec) -> np.ndarray:
    """`LlamaModel.generate_extra_tensors`: the factor each RoPE frequency is divided by."""
    rope, dim = spec.rope, spec.head_dim
    freqs = 1.0 / (float(rope.get("rope_theta", 10000.0)) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)
