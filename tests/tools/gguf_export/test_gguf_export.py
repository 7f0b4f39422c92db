"""The exporter as a library, on tiny byte-level BPE models: Llama and Qwen2, tied and untied, rsLoRA
with per-module alpha; per-tensor types; refusals before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from gguf_models import gguf_model, ids_of, make_model, make_random_lora, max_logit_diff, merged_model
from safetensors.torch import save_file

from sapo_lite.errors import ExportError, ModelError, SapoError
from sapo_lite.tools.gguf_export import export_gguf


def one_line(error: SapoError) -> str:
    assert "\n" not in error.message and "\n" not in (error.hint or "")
    return error.message


@pytest.mark.parametrize(("kind", "overrides", "lora"), [
    ("llama", {}, {"use_rslora": True, "alpha_pattern": {"down_proj": 3}}),  # scale alpha/sqrt(r), one module apart
    ("llama", {"tie_word_embeddings": True}, {}),  # (biases on Llama: transformers reads none back; llama.cpp test)
    ("qwen2", {"tie_word_embeddings": True}, {}),  # q/k/v biases, no Q/K permutation
])
def test_f32_export_equals_the_peft_merge(tmp_path, known_pre_tokenizer, kind, overrides, lora):
    base = make_model(tmp_path / "base", kind, tokenizer="bytelevel", **overrides)
    known_pre_tokenizer(base, kind)
    adapter = make_random_lora(base, tmp_path / "adapter", **lora)
    report = export_gguf(base, tmp_path / "tiny.gguf", "f32", adapter_dir=adapter)
    assert report.arch == kind and report.lora_weights == 14  # 7 linear layers x 2 blocks
    merged = merged_model(base, adapter)
    assert max_logit_diff(merged_model(base), merged, ids_of(base)) > 0.1  # the adapter matters
    assert max_logit_diff(gguf_model(tmp_path / "tiny.gguf"), merged, ids_of(base)) < 1e-3


def test_q4_0_keeps_norms_in_f32_and_the_tied_output_matrix_in_q8_0(tmp_path, known_pre_tokenizer):
    base = make_model(tmp_path / "base", tokenizer="bytelevel", tie_word_embeddings=True)
    known_pre_tokenizer(base)
    report = export_gguf(base, tmp_path / "tiny.gguf", "q4_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types  # llama.cpp reuses token_embd
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert report.tensor_types == {"F32": 5, "Q8_0": 1, "Q4_0": 14}


def test_an_unknown_byte_level_pre_tokenizer_is_refused(tmp_path):
    base = make_model(tmp_path / "base", tokenizer="bytelevel")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ExportError) as info:
        export_gguf(base, out / "tiny.gguf", "f32")
    assert "pre-tokenizer is not one llama.cpp knows" in one_line(info.value)
    assert list(out.iterdir()) == []


def fake_adapter(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@pytest.mark.parametrize(("layer", "shape_a", "expected"), [
    (99, (4, 64), "not in the base"),  # a layer the base does not have
    (0, (4, 96), "is [64, 64] but LoRA"),  # the right name, another model's size
])
def test_an_adapter_of_another_model_is_refused_before_writing(tmp_path, spm_base, layer, shape_a, expected):
    key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    adapter = fake_adapter(tmp_path / "adapter", {f"{key}.lora_A.weight": torch.zeros(shape_a),
                                                  f"{key}.lora_B.weight": torch.zeros(64, 4)})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ModelError) as info:  # the adapter reader's, shared with the folder merge
        export_gguf(spm_base, out / "tiny.gguf", "f32", adapter_dir=adapter)
    assert expected in one_line(info.value)
    assert list(out.iterdir()) == []


def test_writing_in_small_blocks_of_rows_gives_the_same_tensors(tmp_path, spm_base, spm_run, monkeypatch):
    """Large tensors are streamed in blocks of rows (Q/K permuted head by head, the LoRA delta per block);
    the tiny tensors fit one block, so shrink the block to make every tensor take several."""
    import numpy as np

    from sapo_lite.tools.gguf_export import export as export_module

    adapter = spm_run / "adapters" / "policy"
    export_gguf(spm_base, tmp_path / "whole.gguf", "f32", adapter_dir=adapter)
    monkeypatch.setattr(export_module, "CHUNK_ELEMENTS", 64 * 3)  # 3 rows of 64; Q/K: one 16-row head at a time
    export_gguf(spm_base, tmp_path / "blocks.gguf", "f32", adapter_dir=adapter)
    whole = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "whole.gguf").tensors}
    blocks = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(tmp_path / "blocks.gguf").tensors}
    assert whole.keys() == blocks.keys()
    for name, values in whole.items():  # equal but for the last bit of a matmul split differently
        assert np.allclose(blocks[name], values, rtol=0, atol=1e-6), name
