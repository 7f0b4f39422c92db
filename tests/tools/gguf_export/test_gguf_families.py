"""Each family's GGUF file is what llama.cpp's own converter writes for it (no llama.cpp needed): the same
hyper-parameter keys and values, the same tensors with the same shapes, and the same GGML type per tensor at f32,
f16 and q8_0, as recorded from `convert_hf_to_gguf.py` in converter_expectations.json (record_converter.py).
The arithmetic the converter does on a family's weights is checked on the values: Gemma's norms stored as
w + 1, Phi's fused projections holding the merged adapter, Llama 3.1's RoPE factors; the llama.cpp tests
(test_gguf_families_llamacpp.py) check that the files compute the merged model."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from gguf_families import FAMILIES
from gguf_models import merged_folder, merged_model
from record_converter import EXPECTATIONS, QUANTS, read_f32_tensors, read_gguf, read_header

from sapo_lite.errors import ExportError
from sapo_lite.tools.gguf_export import export_gguf

CONVERTER = json.loads(EXPECTATIONS.read_text())["families"]


def same_value(ours: object, theirs: object) -> bool:
    if isinstance(ours, float) and isinstance(theirs, float):
        return math.isclose(ours, theirs, rel_tol=1e-6)
    return ours == theirs


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_is_written_as_llamacpps_converter_writes_it(family_base, family, tmp_path):
    base, adapter = family_base(family)
    expected = CONVERTER[family]
    for quant in QUANTS:
        out = tmp_path / f"{family}.{quant}.gguf"
        export_gguf(base, out, quant, adapter_dir=adapter)
        keys, tensors = read_gguf(out)
        assert {name: shape for name, (shape, _) in tensors.items()} == expected["shapes"], quant
        assert {name: qtype for name, (_, qtype) in tensors.items()} == expected[quant], quant
        if quant == "f32":
            assert keys.keys() == expected["keys"].keys()
            differ = {k: (v, expected["keys"][k]) for k, v in keys.items() if not same_value(v, expected["keys"][k])}
            assert not differ


@pytest.fixture
def exported(family_base, tmp_path):
    """`exported(FAMILY)`: (the f32 export's tensors, the merged reference model's weights as numpy)."""

    def export(family: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        base, adapter = family_base(family)
        export_gguf(base, tmp_path / f"{family}.gguf", "f32", adapter_dir=adapter)
        reference = {k: v.numpy() for k, v in merged_model(base, adapter).state_dict().items()}
        return read_f32_tensors(tmp_path / f"{family}.gguf"), reference

    return export


def test_gemma_norms_are_stored_plus_one_after_the_merge(exported):
    ours, ref = exported("gemma3")
    for gguf_name, hf_name in [("blk.5.attn_norm", "input_layernorm"), ("blk.5.post_attention_norm",
                               "post_attention_layernorm"), ("blk.5.ffn_norm", "pre_feedforward_layernorm"),
                               ("blk.5.post_ffw_norm", "post_feedforward_layernorm"),
                               ("blk.5.attn_q_norm", "self_attn.q_norm"), ("blk.5.attn_k_norm", "self_attn.k_norm")]:
        np.testing.assert_allclose(ours[f"{gguf_name}.weight"], ref[f"model.layers.5.{hf_name}.weight"] + 1, atol=1e-6)
    np.testing.assert_allclose(ours["output_norm.weight"], ref["model.norm.weight"] + 1, atol=1e-6)
    np.testing.assert_allclose(ours["blk.0.attn_q.weight"], ref["model.layers.0.self_attn.q_proj.weight"], atol=1e-6)
    assert "output.weight" not in ours  # tied: llama.cpp reuses token_embd


def test_phi_keeps_the_fused_projections_with_the_adapter_merged_into_them(exported):
    ours, ref = exported("phi4")
    for gguf_name, hf_name in [("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")]:
        np.testing.assert_allclose(ours[f"blk.1.{gguf_name}.weight"], ref[f"model.layers.1.{hf_name}.weight"],
                                   atol=1e-5)


def test_phi4_minis_longrope_factors_are_tensors_for_the_rotated_part_of_each_head(exported, family_base):
    ours, _ = exported("phi4_mini")
    config = json.loads((family_base("phi4_mini")[0] / "config.json").read_text())["rope_parameters"]
    assert len(ours["rope_factors_long.weight"]) == 6  # 3/4 of a 16-wide head rotates: 12 dims, 6 frequencies
    np.testing.assert_allclose(ours["rope_factors_long.weight"], config["long_factor"])
    np.testing.assert_allclose(ours["rope_factors_short.weight"], config["short_factor"])


def test_llama31_rope_scaling_is_the_rope_freqs_tensor(exported):
    ours, _ = exported("llama31")
    # llama3 scaling with factor 8 over 64 original positions: the slowest frequencies are divided by 8,
    # the fastest kept, those between smoothly interpolated
    factors = ours["rope_freqs.weight"]
    assert factors.shape == (8,) and factors[0] == 1.0 and factors[-1] == 8.0
    assert np.all(np.diff(factors) >= 0) and 1.0 < factors[1] < 8.0


def test_an_unsupported_architecture_names_the_supported_ones_and_llamacpps_command(family_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(family_base("qwen3")[0], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["Gemma2ForCausalLM"]}))
    with pytest.raises(ExportError) as info:
        export_gguf(base, tmp_path / "m.gguf", "q8_0")
    for name in ("Gemma2ForCausalLM", "Qwen3ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"):
        assert name in info.value.message
    assert "convert_hf_to_gguf.py" in info.value.hint and "--outtype" in info.value.hint
    assert not (tmp_path / "m.gguf").exists()


def test_a_gemma_attention_scale_llamacpp_would_ignore_is_refused(family_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(family_base("gemma3")[0], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": 64}))
    with pytest.raises(ExportError) as info:
        export_gguf(base, tmp_path / "m.gguf", "f32")
    assert "query_pre_attn_scalar is 64" in info.value.message and "1/sqrt(32)" in info.value.message


def test_gemmas_own_kind_of_tokenizer_gets_no_leading_space(gemma_spm_base, tmp_path):
    """llama.cpp puts a space before the text for a SentencePiece-style vocabulary unless told not to; Gemma's
    tokenizer does not (without the key llama.cpp tokenizes every text differently: test_gguf_families_llamacpp)."""
    export_gguf(gemma_spm_base, tmp_path / "m.gguf", "f32")
    keys, _, _ = read_header(tmp_path / "m.gguf")
    assert keys["tokenizer.ggml.model"] == "llama" and keys["tokenizer.ggml.add_space_prefix"] is False


def test_gemma_layer_types_off_llamacpps_default_pattern_are_written_out(family_base, tmp_path):
    """llama.cpp takes every 6th Gemma layer as global unless the file lists them; the tiny Gemma's 6 layers follow
    that default (no key, as the converter writes), another arrangement is written as the per-layer list."""
    base = tmp_path / "base"
    shutil.copytree(family_base("gemma3")[0], base)
    export_gguf(base, tmp_path / "default.gguf", "f32")
    assert "gemma3.attention.sliding_window_pattern" not in read_header(tmp_path / "default.gguf")[0]
    config = json.loads((base / "config.json").read_text())
    layer_types = ["full_attention", *config["layer_types"][1:]]
    (base / "config.json").write_text(json.dumps({**config, "layer_types": layer_types}))
    export_gguf(base, tmp_path / "other.gguf", "f32")
    keys = read_header(tmp_path / "other.gguf")[0]
    assert keys["gemma3.attention.sliding_window_pattern"] == [False, True, True, True, True, False]


def test_gemma3_multimodal_checkpoint_is_written_as_its_text_model(gemma_mm, tmp_path):
    """Gemma 3 4B-27B are Gemma3ForConditionalGeneration: the file is the converter's for that class, which is its
    gemma3 record (the text model): the same keys, tensors and types, no vision tower or projector."""
    base, adapter = gemma_mm
    expected = CONVERTER["gemma3"]
    for quant in ("f32", "q8_0"):
        out = tmp_path / f"mm.{quant}.gguf"
        export_gguf(base, out, quant, adapter_dir=adapter)
        keys, tensors = read_gguf(out)
        assert not [name for name in tensors if name.startswith(("v.", "mm."))]
        assert {name: shape for name, (shape, _) in tensors.items()} == expected["shapes"], quant
        assert {name: qtype for name, (_, qtype) in tensors.items()} == expected[quant], quant
        if quant == "f32":
            assert keys == expected["keys"]


def test_gemma3_multimodal_adapter_is_merged_into_the_text_weights(gemma_mm, tmp_path):
    """The adapter names `model.language_model.layers.N`, the checkpoint `language_model.model.layers.N`: the
    LoRA lands on the text weights (its vision-tower part is not exported)."""
    base, adapter = gemma_mm
    export_gguf(base, tmp_path / "mm.gguf", "f32", adapter_dir=adapter)
    ours = read_f32_tensors(tmp_path / "mm.gguf")
    ref = {k: v.numpy() for k, v in merged_model(base, adapter).state_dict().items()}
    text = "model.language_model"
    for gguf_name, hf_name in [("blk.0.attn_q", "self_attn.q_proj"), ("blk.5.attn_v", "self_attn.v_proj"),
                               ("blk.3.ffn_down", "mlp.down_proj"), ("blk.5.ffn_gate", "mlp.gate_proj")]:
        np.testing.assert_allclose(ours[f"{gguf_name}.weight"], ref[f"{text}.layers.{gguf_name[4]}.{hf_name}.weight"],
                                   atol=1e-6)
    np.testing.assert_allclose(ours["blk.5.post_ffw_norm.weight"],
                               ref[f"{text}.layers.5.post_feedforward_layernorm.weight"] + 1, atol=1e-6)
    np.testing.assert_allclose(ours["token_embd.weight"], ref[f"{text}.embed_tokens.weight"])


def test_gemma3_multimodal_run_merges_to_a_folder_that_computes_the_merged_model(gemma_mm, tmp_path):
    base, adapter = gemma_mm
    folder = merged_folder(base, adapter, tmp_path / "merged")
    ids = torch.tensor([list(range(2, 40, 3))])
    with torch.no_grad():
        ours, want = folder(ids).logits, merged_model(base, adapter)(ids).logits
        base_logits = merged_model(base)(ids).logits
    assert (want - base_logits).abs().max() > 0.1  # the adapter matters
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


def test_gemma_embedding_rows_beyond_the_sentencepiece_vocabulary_are_pad_tokens(gemma_spm_base, tmp_path):
    """Gemma 3 4B-27B have 262,208 embedding rows for a tokenizer of 262,145 tokens: the converter pads the
    vocabulary with unused `[PADn]` tokens (llama.cpp wants one token per row) rather than refusing."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    shutil.copytree(gemma_spm_base, base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    n_tokens = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n_tokens + 8, mean_resizing=False)
    model.save_pretrained(base)
    export_gguf(base, tmp_path / "m.gguf", "f32")
    keys, tensors, _ = read_header(tmp_path / "m.gguf")
    tokens, types = keys["tokenizer.ggml.tokens"], keys["tokenizer.ggml.token_type"]
    assert len(tokens) == tensors["token_embd.weight"][0][1] == n_tokens + 8
    assert tokens[n_tokens:] == [f"[PAD{i}]" for i in range(1, 9)] and set(types[n_tokens:]) == {5}  # UNUSED
