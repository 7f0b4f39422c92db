"""Phi-3 and Phi-4 (Phi-4-mini too): the converter's `Phi3MiniModel`.

- `qkv_proj` and `gate_up_proj` stay fused (`attn_qkv`, `ffn_up` of twice the width): llama.cpp's PHI3 graph
  splits them itself, and a LoRA on a fused module merges into the fused matrix as it is;
- the converter writes its own key set instead of `TextModel`'s: the RoPE dimension count from
  `partial_rotary_factor` (Phi-4-mini rotates 3/4 of each head), the original context length, and
  `attention.sliding_window` (0 when the config has none; llama.cpp runs Phi without a window either way);
- `longrope` scaling (Phi-3.5, Phi-4-mini) becomes the `rope_factors_long`/`rope_factors_short` tensors and the
  `rope.scaling.attn_factor` key; llama.cpp picks the long factors when its context exceeds the original one.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ....errors import ExportError
from .base import Family, ModelSpec, convert_instead


class Phi3(Family):
    arch = gguf.MODEL_ARCH.PHI3
    hf_archs = ("Phi3ForCausalLM",)
    rope_types = ("default", "longrope", "su")

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        long, short = spec.rope.get("long_factor"), spec.rope.get("short_factor")
        if long and (short is None or len(long) != len(short) or len(long) != rope_dims(spec) / 2):
            raise ExportError(f"Phi-3's RoPE long/short factors must both have {rope_dims(spec) // 2} entries",
                              convert_instead())

    def add_hparams(self, writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
        cfg = spec.config
        writer.add_context_length(cfg["max_position_embeddings"])
        writer.add_rope_scaling_orig_ctx_len(int(original_context(spec)))
        writer.add_embedding_length(spec.hidden)
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_block_count(spec.n_layer)
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
        writer.add_rope_dimension_count(rope_dims(spec))
        writer.add_rope_freq_base(float(spec.rope.get("rope_theta", 10000.0)))
        writer.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if spec.rope.get("long_factor"):
            scale = cfg["max_position_embeddings"] / original_context(spec)
            attn_factor = math.sqrt(1 + math.log(scale) / math.log(original_context(spec))) if scale > 1.0 else 1.0
            writer.add_rope_scaling_attn_factors(attn_factor)

    def extra_tensors(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        if not spec.rope.get("long_factor"):
            return {}
        long, short = (gguf.TENSOR_NAMES[t] + ".weight" for t in (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG,
                                                                   gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT))
        return {long: np.asarray(spec.rope["long_factor"], np.float32),
                short: np.asarray(spec.rope["short_factor"], np.float32)}


def rope_dims(spec: ModelSpec) -> int:
    return int(float(spec.rope.get("partial_rotary_factor", 1.0)) * spec.hidden) // spec.n_head


def original_context(spec: ModelSpec) -> int:
    return int(spec.rope.get("original_max_position_embeddings") or spec.config["max_position_embeddings"])
