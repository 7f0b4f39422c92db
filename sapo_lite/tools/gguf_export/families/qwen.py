"""Qwen2.5 and Qwen3: the converter's `Qwen2Model` and `Qwen3Model`.

Both run NEOX-style RoPE in llama.cpp, so Q/K are written as stored (no permutation), and neither adds keys
to `TextModel`'s. What Qwen3 adds, per-head `q_norm`/`k_norm` (`attn_q_norm`/`attn_k_norm`) and head_dim 128
where 4096/32 would also be 128 but 1024/16 (0.6B) would be 64, is covered by the tensor name map and the
`key_length` key the base class writes for any config with a head_dim.
"""

from __future__ import annotations

import gguf

from .base import Family


class Qwen2(Family):
    arch = gguf.MODEL_ARCH.QWEN2
    hf_archs = ("Qwen2ForCausalLM",)


class Qwen3(Family):
    arch = gguf.MODEL_ARCH.QWEN3
    hf_archs = ("Qwen3ForCausalLM",)
