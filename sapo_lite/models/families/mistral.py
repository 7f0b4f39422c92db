"""Mistral 7B and Mistral-Nemo (MistralForCausalLM): the Llama layout, with a sliding window on some.

Quirks: Nemo's head_dim 128 != 5120 / 32 (read from the attention module, never derived), a 131k
vocabulary, no sliding window (Mistral 7B v0.1 has 4096: the lean loop masks it as transformers does); the
template has no system turn of its own (Nemo's puts the system message into the last user turn) and no
generation prompt: `[/INST]` ends the prompt, `</s>` the answer.
"""

from __future__ import annotations

from .base import ChatMarkers, Family


class Mistral(Family):
    name = "mistral-nemo"
    label = "Mistral-Nemo"
    model_type = "mistral"
    prefix = "Mistral"
    template = "mistral-nemo"
    markers = ChatMarkers(bos="<s>", eos="</s>", pad="<pad>", end_of_turn="</s>", specials=("[INST]", "[/INST]"))
    tiny_config = {"model_type": "mistral", "head_dim": 32, "sliding_window": None, "rope_theta": 1000000.0,
                   "tie_word_embeddings": False}
    preset = "mistral-nemo-12b-qlora"
    notes = ("the template puts a system message into the last user turn, so a prompt's rendering changes once the "
             "answer follows it: the answer is then tokenized on its own, with `</s>` after it")
