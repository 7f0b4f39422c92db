"""Llama 3.1 / 3.2 (LlamaForCausalLM): the layout every other family is described against.

Quirks: RoPE scaling type `llama3` (frequencies rescaled once, at load: the rotary module's table is what
the lean loop reads, so nothing to do here), tied embeddings in 3.2 1B/3B, an explicit `head_dim`, a 128k
vocabulary, `<|eot_id|>` ends a turn. Also covers SmolLM2 and the `tiny` demo model (Llama architecture).
"""

from __future__ import annotations

from .base import ChatMarkers, Family


class Llama(Family):
    name = "llama3"
    label = "Llama 3.1 / 3.2"
    model_type = "llama"
    prefix = "Llama"
    template = "llama3"
    markers = ChatMarkers(bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>",
                          end_of_turn="<|eot_id|>",
                          specials=("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"))
    tiny_config = {
        "model_type": "llama", "head_dim": 16, "tie_word_embeddings": True, "max_position_embeddings": 131072,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    }
    preset = "llama31-8b-qlora"
    notes = ("gated on the Hub (accept Meta's licence, then `hf auth login`); the template always writes a system "
             "header with its knowledge-cutoff lines")
