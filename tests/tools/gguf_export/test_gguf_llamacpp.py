"""The exports in llama.cpp itself (llama-cpp-python): the same tokens, the same logits and greedy answers
as transformers on the merged model, and a stop at the end of the turn. Skipped where `llama_cpp` cannot
be imported: it has no wheel on the package index and builds from source in 15-60 minutes
(`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python`)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf_models import (
    TEXTS,
    agreement,
    gguf_model,
    greedy_hf,
    greedy_llamacpp,
    ids_of,
    make_model,
    make_random_lora,
    merged_model,
)
from transformers import AutoTokenizer
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.data.examples import install_chat_template, render_prompt_ids, stop_token_ids
from sapo_lite.models.roles import load_tokenizer
from sapo_lite.tools.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (import llama_cpp failed); "
                                "it builds from source: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python")
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
           "How many legs does a spider have?", "Explain in one sentence what a CPU does."]
MAX_NEW = 48


def load(path, logits_all=False):
    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, logits_all=logits_all, n_threads=1)


def test_the_sentencepiece_style_export_tokenizes_like_training(spm_run, spm_base, tmp_path):
    out = tmp_path / "tiny.f32.gguf"
    assert CliRunner().invoke(app, ["merge", str(spm_run), "--out", str(out), "--quant", "f32"]).exit_code == 0
    tokenizer = AutoTokenizer.from_pretrained(spm_base)
    llm = load(out, logits_all=True)
    try:
        for text in [*TEXTS, "h\u00e9llo w\u00f6rld \U0001f999"]:  # chat markers; bytes only the fallback covers
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
        ids = ids_of(spm_base)[0]
        llm.eval(ids)
        with torch.no_grad():
            reference = merged_model(spm_base, spm_run / "adapters" / "policy")(torch.tensor([ids])).logits[0].numpy()
        assert np.abs(np.asarray(llm.scores[: len(ids)]) - reference).max() < 0.1  # logits are O(10)
    finally:
        llm.close()


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize(("kind", "overrides"), [
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True}),
    ("qwen2", {"tie_word_embeddings": True}),
])
def test_byte_level_exports_compute_the_merged_model_in_llamacpp(tmp_path, known_pre_tokenizer, kind, overrides):
    """Q/K permutation, biases, a tied output and Llama-3.1's rope_freqs, checked where they are used."""
    base = make_model(tmp_path / "base", kind, tokenizer="bytelevel", **overrides)
    known_pre_tokenizer(base, kind)
    adapter = make_random_lora(base, tmp_path / "adapter")
    export_gguf(base, tmp_path / "tiny.gguf", "f32", adapter_dir=adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = ids_of(base)[1]
    with torch.no_grad():
        reference = merged_model(base, adapter)(torch.tensor([ids])).logits[0].numpy()
    llm = load(tmp_path / "tiny.gguf", logits_all=True)
    try:
        for text in [*TEXTS, "<|im_start|>user\nhi there<|im_end|>\n"]:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    # dropping rope_freqs or the Q/K permutation gives differences above 10
    assert np.abs(got - reference).max() < 0.1


# ---------------------------------------------------------------- SmolLM2 (slow: trains the smollm2-135m preset)


@pytest.fixture(scope="module")
def smol(smollm2_base_dir, smol_lora):
    """The preset's tokenizer and template, and transformers' greedy answers of SmolLM2 + `smol_lora` merged
    (conftest.py says why not the two-step run's policy)."""
    tokenizer = load_tokenizer(str(smollm2_base_dir))
    install_chat_template(tokenizer, None)  # the preset trains with SmolLM2's own template
    stops = stop_token_ids(tokenizer)
    merged = merged_model(smollm2_base_dir, smol_lora)
    prompts = {p: render_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS}
    return tokenizer, stops, {p: (ids, greedy_hf(merged, ids, MAX_NEW, stops)) for p, ids in prompts.items()}


@pytest.mark.slow
@pytest.mark.parametrize(("quant", "min_agreed"), [("f16", 0.8), ("q8_0", 0.5), ("q4_0", 0.4)])
def test_smollm2_greedy_answers_in_llamacpp_follow_transformers(smol_lora_exports, smol, quant, min_agreed):
    """f16 and q8_0 against the merged model in fp32. Q4_0 moves a 135M model's greedy answers too far for that
    comparison to say anything about the file, so q4_0 is held to transformers reading the same Q4_0 file
    (dequantised): llama.cpp must compute the weights the file holds. Measured with llama-cpp-python 0.3.36 on
    this project's CPU machines: f16 111/111 tokens, q8_0 84/111, q4_0 121/208 (a misread file agrees on
    almost none)."""
    tokenizer, stops, reference = smol
    if quant == "q4_0":
        from_file = gguf_model(smol_lora_exports[quant])
        reference = {p: (ids, greedy_hf(from_file, ids, MAX_NEW, stops)) for p, (ids, _) in reference.items()}
    llm = load(smol_lora_exports[quant])
    agreed, total = 0, 0
    try:
        for prompt, (ids, expected) in reference.items():
            assert llm.tokenize(tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids
            got, stopped = greedy_llamacpp(llm, ids, MAX_NEW)
            n = agreement(expected, got)
            agreed, total = agreed + n, total + len(expected)
            print(f"{quant} {prompt!r}: {n}/{len(expected)} tokens as transformers; stopped by itself: {stopped}")
            if n == len(expected) and expected[-1] in stops:  # same answer to its end: llama.cpp stops there too
                assert stopped and got[-1] == expected[-1]
    finally:
        llm.close()
    assert agreed >= min_agreed * total, (agreed, total)


@pytest.mark.slow
def test_smollm2_chat_in_llamacpp_uses_the_training_template_and_stops(smol_lora_exports, smol):
    tokenizer, _, reference = smol
    llm = load(smol_lora_exports["f16"])
    try:
        assert llm.metadata["tokenizer.chat_template"] == tokenizer.chat_template
        result = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], max_tokens=MAX_NEW,
                                            temperature=0.0, top_k=1, repeat_penalty=1.0)
    finally:
        llm.close()
    choice = result["choices"][0]
    expected = tokenizer.decode(reference[PROMPTS[0]][1], skip_special_tokens=True)
    print(f"llama.cpp chat, {PROMPTS[0]!r}: {choice['message']['content']!r} ({choice['finish_reason']})")
    assert choice["finish_reason"] == "stop" and choice["message"]["content"].strip() == expected.strip()
    assert "Paris" in expected


@pytest.mark.slow
def test_the_k_quant_route_from_our_f16_export_works(smol_lora_exports, tmp_path):
    """The K-quant refusal's command makes a file that answers. (Our own Q8_0/Q4_0 blocks are checked against
    the merged weights in test_gguf_quant_blocks.py, which needs no llama.cpp.)"""
    out = tmp_path / "Q4_K_M.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M, 1
    assert llama_cpp.llama_model_quantize(str(smol_lora_exports["f16"]).encode(), str(out).encode(), params) == 0
    types = {t.tensor_type.name for t in gguf.GGUFReader(out).tensors}  # what `llama-quantize F16 OUT Q4_K_M` writes
    llm = load(out)
    answer = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], max_tokens=16,
                                        temperature=0.0)["choices"][0]["message"]["content"]
    llm.close()
    print(f"llama-quantize Q4_K_M of our F16, {PROMPTS[0]!r}: {answer!r}")  # 4 bits are rough on 135M
    assert "Q4_K" in types and answer.strip()  # loads and answers
