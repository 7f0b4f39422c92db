"""Qwen2.5 (Qwen2ForCausalLM): the Llama layout with biases on q, k and v.

Quirks: q/k/v biases (the lean loop adds them after its projections), tied embeddings in the small sizes,
a 152k vocabulary, ChatML with a default system message when none is given, `<|im_end|>` ends a turn.
"""

from __future__ import annotations

from .base import ChatMarkers, Family


class Qwen2(Family):
    name = "qwen2.5"
    label = "Qwen2.5"
    model_type = "qwen2"
    prefix = "Qwen2"
    template = "qwen2"
    markers = ChatMarkers(bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn="<|im_end|>",
                          specials=("<|im_start|>",))
    tiny_config = {"model_type": "qwen2", "tie_word_embeddings": True, "rope_theta": 1000000.0}
    notes = "the template adds Qwen's default system message when the data has none"
