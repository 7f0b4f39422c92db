"""Each family's export in llama.cpp itself (llama-cpp-python): the same token ids as transformers, and
teacher-forced logits that agree with transformers' on the base with the adapter merged by peft. Skipped
where `llama_cpp` cannot be imported (it builds from source: test_gguf_llamacpp.py says how).

The texts are longer than Gemma's 8-token sliding window, so its local layers really slide; llama.cpp runs
with a context below Phi's original 256 positions, where both it and transformers use the short RoPE factors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf_families import FAMILIES
from gguf_models import TEXTS, merged_folder, merged_model
from transformers import AutoTokenizer

from sapo_lite.tools.gguf_export import export_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (import llama_cpp failed); "
                                "it builds from source: CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install llama-cpp-python")
# (top-1 share, least per-position correlation) each quant type must reach; f32 is the exporter's own accuracy
# (llama.cpp keeps its KV cache in f16), the others add their rounding
FLOORS = {"f32": (0.95, 0.999), "f16": (0.9, 0.998), "q8_0": (0.8, 0.99)}


def agreement(got: np.ndarray, want: np.ndarray) -> tuple[float, float, float]:
    """(share of positions with the same top-1 token, least correlation of a position's logits, max |diff|)."""
    top1 = float(np.mean(got.argmax(-1) == want.argmax(-1)))
    corr = min(float(np.corrcoef(g, w)[0, 1]) for g, w in zip(got, want))
    return top1, corr, float(np.abs(got - want).max())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_family_computes_the_merged_model_in_llamacpp(family_base, family, tmp_path):
    base, adapter = family_base(family)
    check_in_llamacpp(family, base, adapter, merged_model(base, adapter), FLOORS, tmp_path)


@pytest.mark.slow
def test_gemma3_multimodal_text_model_computes_the_merged_folder_in_llamacpp(gemma_mm, tmp_path):
    """Gemma3ForConditionalGeneration's export against transformers on `sapo-lite merge`'s folder of the same run."""
    base, adapter = gemma_mm
    reference = merged_folder(base, adapter, tmp_path / "merged")
    check_in_llamacpp("gemma3_mm", base, adapter, reference, {"f32": FLOORS["f32"]}, tmp_path)


def check_in_llamacpp(family: str, base: Path, adapter: Path, reference: Any,
                      floors: dict[str, tuple[float, float]], tmp_path: Path) -> None:
    """Export base + adapter at each quant type of `floors`; llama.cpp's tokens and teacher-forced logits on TEXTS
    must match `reference`'s (transformers) to those floors."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = [tokenizer(text).input_ids for text in TEXTS]
    with torch.no_grad():
        want = [reference(torch.tensor([x])).logits[0].numpy() for x in ids]
    for quant, (min_top1, min_corr) in floors.items():
        out = tmp_path / f"{family}.{quant}.gguf"
        export_gguf(base, out, quant, adapter_dir=adapter)
        llm = llama_cpp.Llama(model_path=str(out), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                              n_threads=1)
        got = []
        try:
            for text, x in zip(TEXTS, ids):
                assert llm.tokenize(text.encode(), add_bos=False, special=True) == x, (family, text)
                llm.reset()
                llm.eval(x)
                got.append(np.array(llm.scores[: len(x)], dtype=np.float32))  # a copy: the next eval overwrites scores
        finally:
            llm.close()
        top1, corr, diff = agreement(np.concatenate(got), np.concatenate(want))
        positions = sum(map(len, ids))
        print(f"{family} {quant}: same ids; top-1 {top1:.3f} of {positions} positions, min corr {corr:.7f}, "
              f"max |diff| {diff:.3f}")
        assert top1 >= min_top1 and corr >= min_corr, (family, quant, top1, corr)


def test_gemmas_own_kind_of_tokenizer_tokenizes_as_in_transformers(gemma_spm_base, tmp_path):
    export_gguf(gemma_spm_base, tmp_path / "m.gguf", "f32")
    tokenizer = AutoTokenizer.from_pretrained(gemma_spm_base)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=128, verbose=False, n_threads=1)
    try:
        for text in [*TEXTS, "hello world", " two  spaces"]:
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer(text).input_ids, text
    finally:
        llm.close()
