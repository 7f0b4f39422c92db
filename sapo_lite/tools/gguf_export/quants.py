"""Which quantisation types the export writes, and the GGML type of each tensor.

The `gguf` package quantises F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1 and Q4_0 in Python (bit for bit what
llama.cpp's own quantiser writes from the same input); K-quants and I-quants it can only read. So
those are refused with the llama-quantize command that makes them from an F16 export, which is also
how llama.cpp advises making them (from F16 or BF16, never from an already quantised file).
"""

from __future__ import annotations

import re
from pathlib import Path

import gguf

from ...errors import ExportError

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType
# --quant -> (general.file_type, GGML type of the 2-D weight matrices), smallest loss first
QUANT_TYPES: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (F.ALL_F32, Q.F32),
    "f16": (F.MOSTLY_F16, Q.F16),
    "bf16": (F.MOSTLY_BF16, Q.BF16),
    "q8_0": (F.MOSTLY_Q8_0, Q.Q8_0),
    "q5_1": (F.MOSTLY_Q5_1, Q.Q5_1),
    "q5_0": (F.MOSTLY_Q5_0, Q.Q5_0),
    "q4_1": (F.MOSTLY_Q4_1, Q.Q4_1),
    "q4_0": (F.MOSTLY_Q4_0, Q.Q4_0),
}
LLAMA_QUANTIZE_ONLY = re.compile(r"^(q[2-6]_k(_[sml])?|iq[1-4]_\w+|tq[12]_0|mxfp4\w*)$")


def f16_name(out_file: Path, quant: str) -> Path:
    """`model.q4_k_m.gguf` -> `model.f16.gguf`: the F16 export a K-quant is made from."""
    stem = out_file.stem
    if stem.lower().endswith(f".{quant.lower()}"):
        stem = stem[: -len(quant) - 1]
    return out_file.with_name(f"{stem}.f16.gguf")


def quant_in_name(out_file: Path) -> str | None:
    """The quantisation a file name announces (`model.q4_0.gguf`, `Model-Q4_K_M.gguf`), else None."""
    last = re.split(r"[.-]", out_file.stem)[-1].lower()
    return last if last in QUANT_TYPES or LLAMA_QUANTIZE_ONLY.match(last) else None


def quant_for(quant: str | None, out_file: Path) -> str:
    """--quant as given, else the one the file name announces, else q8_0. A name that announces another
    quantisation than --quant is refused: the file would say one thing and hold another."""
    named = quant_in_name(out_file)
    if quant is None:
        return named or "q8_0"
    if named and named != quant.lower():
        stem = out_file.stem[: -len(named) - 1]
        raise ExportError(f"--out `{out_file.name}` names {named}, but --quant {quant} writes {quant.lower()}",
                          f"name the file for what it holds (e.g. {stem}.{quant.lower()}.gguf), or drop --quant "
                          f"to write {named}")
    return quant


def resolve_quant(quant: str, out_file: Path, export_f16: str | None = None) -> str:
    """The name of a writable `quant`, or the one-line refusal; `export_f16` (with `{f16}`) makes the F16 file."""
    key = quant.lower()
    if key in QUANT_TYPES:
        return key
    if LLAMA_QUANTIZE_ONLY.match(key):
        f16 = f16_name(out_file, key)
        raise ExportError(
            f"--quant {quant} can only be written by llama.cpp's llama-quantize (the gguf package cannot write "
            "K-quants or I-quants)",
            f"{(export_f16 or 'export with --quant f16 to {f16}').format(f16=f16)}, then: "
            f"llama-quantize {f16} {out_file} {key.upper()}",
        )
    raise ExportError(f"unknown --quant {quant}", f"choose one of {', '.join(QUANT_TYPES)}")


def tensor_type(name: str, shape: tuple[int, ...], weight_type: gguf.GGMLQuantizationType,
                tied: bool) -> gguf.GGMLQuantizationType:
    """GGML type of one tensor, by the converter's rules (`ModelBase.prepare_tensors`)."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return Q.F32  # llama.cpp's kernels expect 1-D tensors (norms, biases) in F32
    qtype = weight_type
    is_output = name == "output.weight" or (tied and name == "token_embd.weight")
    if qtype in (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1) and is_output:
        qtype = Q.Q8_0  # llama-quantize keeps the output matrix at higher precision (Q6_K there; Q8_0 is ours)
    if shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0] != 0:
        return Q.F16  # the converter's fallback when rows do not split into whole quant blocks
    return qtype
