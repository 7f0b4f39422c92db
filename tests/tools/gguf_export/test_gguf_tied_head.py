"""A LoRA on a tied output head (SmolLM2, Llama 3.2, Qwen2.5, Gemma tie theirs): the GGUF gets the head as its
own `output.weight` (embedding + the head's delta) and keeps `token_embd` the embedding, which llama.cpp also
reads for the input. peft's merge_and_unload writes the head's delta into the shared tensor, so the reference
here is the base + adapter unmerged."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf_models import gguf_model, ids_of, make_model
from transformers import AutoModelForCausalLM

from sapo_lite.tools.gguf_export import export_gguf


def head_lora(base_dir, out_dir, also=()):
    """LoRA on q/v and the tied head (and `also`), random B (the head's large, so its delta stands above float
    noise; peft starts an embedding's A at zero instead)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head", *also]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * (1.0 if "lm_head" in name else 0.2))
    model.save_pretrained(out_dir, save_embedding_layers=False)  # LoRA tensors only, as a run saves them
    return out_dir


def test_a_tied_head_with_a_lora_becomes_its_own_output_matrix(tmp_path, known_pre_tokenizer):
    from peft import PeftModel

    base = make_model(tmp_path / "base", tokenizer="bytelevel", tie_word_embeddings=True)
    known_pre_tokenizer(base)
    adapter = head_lora(base, tmp_path / "adapter")
    export_gguf(base, tmp_path / "tiny.gguf", "f32", adapter_dir=adapter)

    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         adapter).eval()
    embedding = unmerged.get_input_embeddings().weight.detach().numpy()
    head = unmerged.base_model.model.lm_head
    expected_head = embedding + head.get_delta_weight("default").detach().numpy()
    written = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    assert np.array_equal(written["token_embd.weight"], embedding)  # the input embedding as trained: untouched
    assert np.abs(written["output.weight"] - expected_head).max() < 1e-5

    from_file = gguf_model(tmp_path / "tiny.gguf")
    with torch.no_grad():
        for prompt in ids_of(base):
            x = torch.tensor([prompt])
            assert (from_file(x).logits - unmerged(x).logits).abs().max() < 1e-3


def test_llamacpp_computes_the_split_head(tmp_path, known_pre_tokenizer):
    """In llama.cpp itself, with a LoRA on the embedding too: the file's logits are those of the base + adapter
    unmerged (logits of about 10-30)."""
    import pytest

    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (import llama_cpp "
                                    "failed); it builds from source: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install "
                                    "llama-cpp-python")
    from peft import PeftModel

    base = make_model(tmp_path / "base", tokenizer="bytelevel", tie_word_embeddings=True)
    known_pre_tokenizer(base)
    adapter = head_lora(base, tmp_path / "adapter", also=["embed_tokens"])
    export_gguf(base, tmp_path / "tiny.gguf", "f32", adapter_dir=adapter)
    ids = ids_of(base)[1]
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                         adapter).eval()
    with torch.no_grad():
        reference = unmerged(torch.tensor([ids])).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "tiny.gguf"), n_ctx=256, verbose=False, logits_all=True,
                          n_threads=1)
    try:
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    assert np.abs(got - reference).max() < 0.1  # f16 KV cache; head folded into token_embd: 17
