"""The exporter's own Q8_0 and Q4_0 blocks, read back: every weight dequantises to the merged model's weight
within the format's error bound, block by block (32 values share one f16 scale d).

Q8_0: d = max|x| / 127, q = round(x / d): error <= d/2, plus what storing d in f16 costs (127 * |d| * 2^-11).
Q4_0: d = (the value of largest magnitude) / -8, q = round(x / d) clamped to [-8, 7]: error <= |d| (the clamp
at +8), plus the f16 rounding of d (8 * |d| * 2^-11)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf_models import make_random_lora, merged_model

from sapo_lite.tools.gguf_export import export_gguf

BLOCK = 32
F16_STEP = 2.0**-11


def error_bound(weight: np.ndarray, qtype: str) -> np.ndarray:
    """Per value, the largest error the block format allows for `weight` [rows, cols]."""
    amax = np.abs(weight.reshape(weight.shape[0], -1, BLOCK)).max(-1, keepdims=True)
    if qtype == "Q8_0":
        d = amax / 127
        bound = d / 2 + 127 * d * F16_STEP
    else:
        d = amax / 8
        bound = d + 8 * d * F16_STEP
    return np.broadcast_to(bound * 1.001 + 1e-7, amax.shape[:2] + (BLOCK,)).reshape(weight.shape)


@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_written_blocks_dequantise_to_the_merged_weights_within_the_format_bound(tmp_path, spm_base, quant):
    adapter = make_random_lora(spm_base, tmp_path / "adapter")
    export_gguf(spm_base, tmp_path / "tiny.gguf", quant, adapter_dir=adapter)
    merged = {name: p.detach().numpy() for name, p in merged_model(spm_base, adapter).named_parameters()}
    written = {t.name: t for t in gguf.GGUFReader(tmp_path / "tiny.gguf").tensors}
    # not Q/K: their rows are permuted for llama.cpp's RoPE (test_gguf_export.py checks that through logits)
    for gguf_name, hf_name in (("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj.weight"),
                               ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj.weight"),
                               ("blk.1.attn_output.weight", "model.layers.1.self_attn.o_proj.weight")):
        tensor, source = written[gguf_name], merged[hf_name]
        assert tensor.tensor_type.name == quant.upper()
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(source.shape)
        error = np.abs(values - source)
        assert (error <= error_bound(source, tensor.tensor_type.name)).all(), (gguf_name, error.max())
        assert error.max() > 0  # really quantised


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q8_0", "q4_0"])
def test_smollm2_blocks_dequantise_to_the_f16_export_within_the_format_bound(smol_lora_exports, quant):
    """The same on SmolLM2 + a LoRA, against the F16 export of the same merge (itself within 2^-11 of it)."""
    source = {t.name: t for t in gguf.GGUFReader(smol_lora_exports["f16"]).tensors}
    written = {t.name: t for t in gguf.GGUFReader(smol_lora_exports[quant]).tensors}
    for name in ("blk.0.attn_v.weight", "blk.7.ffn_down.weight", "blk.29.ffn_gate.weight"):
        tensor, reference = written[name], np.asarray(source[name].data).astype(np.float32)
        assert tensor.tensor_type.name == quant.upper()
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(reference.shape)
        error = np.abs(values - reference)
        slack = np.abs(reference) * 2 * F16_STEP  # the F16 copy's own rounding
        assert (error <= error_bound(reference, tensor.tensor_type.name) * 1.01 + slack).all(), (name, error.max())
