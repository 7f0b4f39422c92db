"""SmolLM2-135M-Instruct trained two steps with the smollm2-135m preset, exported by `sapo-lite merge`:
the files compute the merged model, keep the GGUF base's tokenizer byte for byte, and carry every
hyper-parameter llama.cpp reads; Q8_0 answers like the merged model (on SmolLM2 with a small random
LoRA, see conftest.py). Slow: the run converts the GGUF base and trains."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from gguf_models import agreement, gguf_model, greedy_hf, max_logit_diff, merged_model

from sapo_lite.data.examples import install_chat_template, render_prompt_ids, stop_token_ids
from sapo_lite.models.roles import load_tokenizer

pytestmark = pytest.mark.slow
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
           "How many legs does a spider have?", "Explain in one sentence what a CPU does."]


def read_kv(path: Path) -> dict:
    return {key: field.contents() for key, field in gguf.GGUFReader(path).fields.items()
            if not key.startswith("GGUF.")}


@pytest.fixture(scope="module")
def smol(smollm2_base_dir, smollm2_run):
    tokenizer = load_tokenizer(str(smollm2_base_dir))
    install_chat_template(tokenizer, None)  # the preset trains with SmolLM2's own template
    merged = merged_model(smollm2_base_dir, smollm2_run / "adapters" / "policy")
    ids = [render_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    return tokenizer, merged, ids


@pytest.mark.parametrize(("quant", "tolerance"), [("f32", 1e-3), ("f16", 0.25)])
def test_smollm2_logits_equal_the_merged_model(smol_exports, smol, quant, tolerance):
    _, merged, ids = smol
    diff = max_logit_diff(gguf_model(smol_exports[quant]), merged, ids[:3])
    print(f"{quant}: max |logit difference| against the merged model {diff:.2e}")
    assert diff < tolerance


def test_smollm2_q8_0_greedy_answers_follow_the_merged_model(smol_lora_exports, smol_lora, smollm2_base_dir, smol):
    tokenizer, _, ids = smol
    stops = stop_token_ids(tokenizer)
    merged = merged_model(smollm2_base_dir, smol_lora)  # see conftest.py: the two-step policy has no clear answers
    q8 = gguf_model(smol_lora_exports["q8_0"])
    shares = []
    for prompt_ids in ids:
        expected, got = greedy_hf(merged, prompt_ids, 32, stops), greedy_hf(q8, prompt_ids, 32, stops)
        shares.append(agreement(expected, got) / len(expected))
    print(f"q8_0: share of each greedy answer equal to the merged model's, from the start: {shares}")
    assert min(shares) > 0 and sum(shares) / len(shares) >= 0.6  # every first token, most of the answers


def test_smollm2_tokenizer_keys_are_the_gguf_bases_unchanged(smol_exports, smollm2_base_dir):
    source = read_kv(Path((smollm2_base_dir / "GGUF_SOURCE").read_text().strip()))
    exported = read_kv(smol_exports["q8_0"])
    for key, value in source.items():
        if key.startswith("tokenizer.") and key != "tokenizer.chat_template":
            assert exported[key] == value, key
    assert {k for k in exported if k.startswith("tokenizer.")} - set(source) == {"tokenizer.ggml.eot_token_id"}
    assert exported["tokenizer.ggml.eot_token_id"] == 2  # <|im_end|>
    tokenizer = load_tokenizer(str(smollm2_base_dir))
    install_chat_template(tokenizer, None)
    assert exported["tokenizer.chat_template"] == tokenizer.chat_template


def test_smollm2_hyper_parameters_and_modelfile(smol_exports):
    kv = read_kv(smol_exports["f16"])
    expected = {
        "llama.block_count": 30, "llama.context_length": 8192, "llama.embedding_length": 576,
        "llama.feed_forward_length": 1536, "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3,
        "llama.rope.freq_base": 100000.0, "llama.vocab_size": 49152, "llama.rope.dimension_count": 64,
        "general.file_type": gguf.LlamaFileType.MOSTLY_F16,
    }
    for key, value in expected.items():
        assert kv[key] == pytest.approx(value), key
    names = [t.name for t in gguf.GGUFReader(smol_exports["f16"]).tensors]
    assert "output.weight" not in names and len(names) == 272  # tied embeddings: llama.cpp reuses token_embd
    modelfile = smol_exports["f16"].with_suffix(".Modelfile").read_text()
    assert "You are a helpful AI assistant named SmolLM" in modelfile  # the template's default system turn
    assert modelfile.endswith('PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|im_end|>"\n')
