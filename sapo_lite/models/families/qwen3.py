"""Qwen3 (Qwen3ForCausalLM): Qwen2 without biases, plus per-head RMSNorms on q and k before RoPE.

Quirks: `q_norm`/`k_norm` over each head's dimensions, applied before the rotation; head_dim 128 where
hidden / heads is 4096 / 32 = 128 for 8B but not for every size (the tiny model sets it apart); a 152k
vocabulary; the chat template's thinking tags.

Thinking and training data: sapo-lite renders prompts with `enable_thinking=False` (data/examples.py), so
the prompt ends with Qwen3's own empty block `<think>\\n\\n</think>\\n\\n` and the response is the answer
alone: no think tag is ever scored, rewritten by the EMA, or re-rendered into a turn. Data whose answers
carry their own `<think>...</think>` reasoning is refused with a one-line error (training on reasoning
traces is a different recipe from SAPO's segment rewrites).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ChatMarkers, Family, LayerModules


class Qwen3(Family):
    name = "qwen3"
    label = "Qwen3"
    model_type = "qwen3"
    prefix = "Qwen3"
    template = "qwen3"
    markers = ChatMarkers(bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
                          specials=("<|im_start|>",), added=("<think>", "</think>"))
    tiny_config = {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True, "rope_theta": 1000000.0}
    preset = "qwen3-8b-qlora"
    notes = "prompts are rendered with enable_thinking=False: answers are trained without think blocks"

    def layer_modules(self, layer: nn.Module, index: int, config: Any) -> LayerModules:
        modules = super().layer_modules(layer, index, config)
        return LayerModules(**{**vars(modules), "q_norm": layer.self_attn.q_norm, "k_norm": layer.self_attn.k_norm})
