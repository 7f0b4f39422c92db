"""Phi-3 / Phi-4 (Phi3ForCausalLM): the Llama layout with fused projections.

Quirks: one `qkv_proj` (outputs q | k | v) and one `gate_up_proj` (outputs gate | up), so LoRA adapts the
fused matrices (`all-linear` finds them; `q_proj` names nothing); Phi-4-mini's partial RoPE (the first
75% of each head's dimensions rotate, the rest pass); tied embeddings (Phi-4-mini); `<|end|>` ends a turn;
the 128k-context variants' `longrope` rescales with the sequence length and stays on `generate`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ChatMarkers, Family, LayerModules


class Phi3(Family):
    name = "phi4-mini"
    label = "Phi-3 / Phi-4"
    model_type = "phi3"
    prefix = "Phi3"
    template = "phi4-mini"
    markers = ChatMarkers(bos=None, eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn="<|end|>",
                          specials=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
    tiny_config = {"model_type": "phi3", "partial_rotary_factor": 0.75, "tie_word_embeddings": True,
                   "rope_theta": 10000.0}
    preset = "phi4-mini-qlora"
    fused_projections = True
    notes = "LoRA targets the fused qkv_proj and gate_up_proj (name them, or use all-linear)"

    def layer_modules(self, layer: nn.Module, index: int, config: Any) -> LayerModules:
        attention, mlp = layer.self_attn, layer.mlp
        return LayerModules(
            input_norm=layer.input_layernorm, qkv=[attention.qkv_proj], q_norm=None, k_norm=None, o=attention.o_proj,
            attention_out_norm=None, pre_mlp_norm=layer.post_attention_layernorm, gate_up=[mlp.gate_up_proj],
            down=mlp.down_proj, mlp_out_norm=None, act=mlp.activation_fn, attention_scale=float(attention.scaling),
            rope=None, window=None if config.sliding_window is None else int(config.sliding_window),
        )
