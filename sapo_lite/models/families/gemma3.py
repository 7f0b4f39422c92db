"""Gemma 3, text (Gemma3ForCausalLM): sandwich norms, QK norms, and two kinds of layer.

Quirks: embeddings scaled by sqrt(hidden) (`Gemma3TextScaledWordEmbedding`, called as is by the loop);
RMSNorm computing x*(1+w) in fp32 (the loop calls Gemma's own norm modules, never `F.rms_norm`); a norm
before and after both attention and MLP; `q_norm`/`k_norm` before RoPE; sliding-window layers with their
own RoPE base beside global ones (`layer_types`, a RoPE table per type); attention scaled by
`query_pre_attn_scalar`^-0.5, not head_dim^-0.5; GELU (tanh); a 262k vocabulary; no system role (the
template folds a system message into the first user turn); `<end_of_turn>` ends a turn. Logit
soft-capping (Gemma 2) is refused by the lean loop.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ChatMarkers, Family, LayerModules, _window


class Gemma3(Family):
    name = "gemma3"
    label = "Gemma 3 (text)"
    model_type = "gemma3_text"
    prefix = "Gemma3"
    template = "gemma3"
    markers = ChatMarkers(bos="<bos>", eos="<eos>", pad="<pad>", end_of_turn="<end_of_turn>",
                          specials=("<start_of_turn>", "<end_of_turn>"))
    tiny_config = {"model_type": "gemma3_text", "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 512,
                   "layer_types": ["sliding_attention", "full_attention"], "tie_word_embeddings": True}
    preset = "gemma3-12b-qlora"
    aliases = ("gemma3",)  # the published 4B/12B/27B checkpoints: Gemma3ForConditionalGeneration (text + vision)
    notes = ("gated on the Hub (accept Google's licence); no system role: the template folds a system message into "
             "the first user turn")

    def causal_classes(self) -> tuple[str, ...]:
        # the published 4B/12B/27B checkpoints load as the multimodal class; text in, it is the text model
        return ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")

    def language_model(self, lm: nn.Module) -> tuple[nn.Module, Any]:
        if hasattr(lm.model, "language_model"):  # Gemma3ForConditionalGeneration: vision tower beside it
            return lm.model.language_model, lm.config.text_config
        return lm.model, lm.config

    def not_lean(self, config: Any) -> str | None:
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if getattr(config, name, None) is not None:
                return f"Gemma's {name} is set"
        if getattr(config, "use_bidirectional_attention", False):
            return "Gemma's bidirectional attention is on"
        return None

    def layer_modules(self, layer: nn.Module, index: int, config: Any) -> LayerModules:
        attention, mlp = layer.self_attn, layer.mlp
        return LayerModules(
            input_norm=layer.input_layernorm, qkv=[attention.q_proj, attention.k_proj, attention.v_proj],
            q_norm=attention.q_norm, k_norm=attention.k_norm, o=attention.o_proj,
            attention_out_norm=layer.post_attention_layernorm, pre_mlp_norm=layer.pre_feedforward_layernorm,
            gate_up=[mlp.gate_proj, mlp.up_proj], down=mlp.down_proj, mlp_out_norm=layer.post_feedforward_layernorm,
            act=mlp.act_fn, attention_scale=float(attention.scaling), rope=config.layer_types[index],
            window=_window(config, index),
        )

    def rotary(self, inner: nn.Module, key: str | None) -> Any:
        return lambda x, positions: inner.rotary_emb(x, positions, key)

    def plain_norm_types(self) -> tuple[str, ...]:
        return ()  # x * (1 + w), computed in fp32 whatever the dtype: Gemma's own module
