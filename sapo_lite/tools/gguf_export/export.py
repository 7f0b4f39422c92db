"""One GGUF file from a Hugging Face base of a supported family (families/) and a LoRA adapter, in one pass.

Every output tensor's name, shape and GGML type is known from the safetensors headers alone, so all
tensor infos are registered first, the header, key/values and tensor infos are written, and then
each tensor is produced block of rows by block of rows: read (`pread`, no mmap), LoRA delta added in
fp32, the family's changes made (Llama's Q/K rows permuted for llama.cpp's RoPE layout, Gemma's norms
stored as w + 1), quantised with the `gguf` package, appended.
A tied output head the adapter changes (or whose embedding it changes) is written as its own
`output.weight` (the embedding's rows + the head's delta), and `token_embd` keeps the embedding as
the adapter leaves it: llama.cpp reads token_embd for the input too, so folding the head's delta into
it would change every input embedding (peft's own merge does exactly that to a tied pair).
Peak memory is one row block plus the Python and torch baseline, whatever the model's size: the
full-precision model is never held, merged or not (tools/merge.py, the folder output, holds a shard).

Two phases, so that a refusal costs nothing: `prepare_export` reads headers, the adapter and the
tokenizer and checks everything; `GgufExport.write` writes to a hidden temporary name beside the
target and renames it only after the last byte, so a failure or Ctrl-C leaves nothing behind.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import gguf
import numpy as np
import torch
from gguf.gguf_writer import WriterState

from ...errors import ExportError
from ...models.lora_file import TIED_HEAD, LoraAdapter
from ...models.safetensors_io import TensorSource
from ..merge import base_shards
from . import tokenizer_kv
from .arch import ModelSpec, gguf_name, load_spec, permute_rows
from .quants import QUANT_TYPES, Q, resolve_quant, tensor_type

CHUNK_ELEMENTS = 1 << 20  # rows are converted in blocks of ~1M values (4 MB in fp32; 4x that was no faster)
EMBED, HEAD = TIED_HEAD
OUTPUT = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"


@dataclass
class ExportReport:
    """What was written."""

    out_file: Path
    quant: str
    arch: str
    file_size: int
    seconds: float
    tensor_types: dict[str, int]  # GGML type name -> number of tensors
    tokenizer_source: str  # "gguf:PATH" (keys copied) or "hf" (built from tokenizer.json)
    lora_weights: int  # base weights the adapter changed

    @property
    def tensors(self) -> int:
        return sum(self.tensor_types.values())


@dataclass
class _Planned:
    """One output tensor: GGUF name and type, and where its data comes from."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    hf_name: str | None = None
    n_heads: int | None = None  # Q/K: rows are permuted head by head
    offset: float = 0.0  # added after the merge (Gemma's norms are stored as w + 1)
    data: np.ndarray | None = None  # tensors the checkpoint does not hold (rope_freqs)
    adapted_as: str | None = None  # the weight whose adapter changes apply, when not hf_name (a split tied head)

    @property
    def nbytes(self) -> int:
        if self.qtype == Q.F32:
            return 4 * math.prod(self.shape)
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * type_size


class _StreamingWriter(gguf.GGUFWriter):
    """A GGUFWriter that appends one tensor's data from several blocks instead of one array."""

    def write_tensor_chunks(self, chunks: Iterable[np.ndarray]) -> None:
        """`GGUFWriter.write_tensor_data`'s bookkeeping (alignment, byte count), streamed."""
        if self.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or self.fout is None or len(self.fout) != 1:
            raise ValueError(f"expected one open output with the tensor infos written, got {self.state}")
        fout = self.fout[0]
        info = self.tensors[0].pop(next(iter(self.tensors[0])))
        self.write_padding(fout, fout.tell())
        written = 0
        for chunk in chunks:
            chunk.tofile(fout)
            written += chunk.nbytes
        if written != info.nbytes:
            raise ValueError(f"tensor data is {written} bytes, its header says {info.nbytes}")
        self.write_padding(fout, info.nbytes)
        self.state = WriterState.WEIGHTS


def _plan(spec: ModelSpec, source: TensorSource, weight_type: gguf.GGMLQuantizationType,
          split_head: bool) -> list[_Planned]:
    """`split_head`: the model is tied and the adapter changes the head or the embedding, so the head is written
    as its own `output.weight` (from lm_head if the checkpoint holds one, else the embedding) + the head's delta."""
    name_map = gguf.get_tensor_name_map(spec.arch, spec.n_layer)
    family = spec.family
    planned = [_Planned(name, data.shape, Q.F32, data=data) for name, data in family.extra_tensors(spec).items()]
    for hf_name, entry in source.entries.items():
        name = gguf_name(spec, name_map, hf_name)
        if name is not None:
            qtype = tensor_type(name, entry.shape, weight_type, spec.tied)
            planned.append(_Planned(name, entry.shape, qtype, hf_name, family.permuted_heads(spec, hf_name),
                                    family.offset(name)))
    if split_head:
        head_source = HEAD if HEAD in source.entries else EMBED
        shape = source.entries[head_source].shape
        planned.append(_Planned(OUTPUT, shape, tensor_type(OUTPUT, shape, weight_type, False), head_source,
                                adapted_as=HEAD))
    if len({p.name for p in planned}) != len(planned):
        raise ExportError("two checkpoint tensors map to the same GGUF tensor", "check the checkpoint's tensor names")

    def order(p: _Planned) -> tuple[int, str]:  # token_embd, blk.0 ... blk.N (numerically), then the rest
        block = p.name.split(".")[1] if p.name.startswith("blk.") else None
        first = p.name.startswith(("token_embd", "rope_"))
        return (int(block) + 1 if block else (0 if first else 1 << 30), p.name)

    return sorted(planned, key=order)


def _chunks(p: _Planned, source: TensorSource, adapter: LoraAdapter | None) -> Iterator[np.ndarray]:
    """The tensor's bytes in blocks of rows: read, add the LoRA delta (fp32) and the offset, permute Q/K, quantise."""
    if p.data is not None:
        yield gguf.quants.quantize(p.data, p.qtype)
        return
    assert p.hf_name is not None
    rows = p.shape[0] if p.shape else 1
    step = max(1, CHUNK_ELEMENTS // max(1, math.prod(p.shape[1:])))
    rows_per_head = rows // p.n_heads if p.n_heads else 1
    step = max(rows_per_head, step // rows_per_head * rows_per_head)  # the permutation works on whole heads
    for start in range(0, rows, step):
        end = min(rows, start + step)
        target = p.adapted_as or p.hf_name
        block = adapter.replacement(target, start, end) if adapter else None
        block = (source.read(p.hf_name, start, end) if block is None else block).to(torch.float32)
        delta = adapter.delta(target, start, end) if adapter else None
        if delta is not None:
            block += delta
        if p.offset:
            block += p.offset
        array = block.numpy()
        if p.n_heads:
            array = permute_rows(array, (end - start) // rows_per_head)
        yield gguf.quants.quantize(array, p.qtype)


def _load_tokenizer(base_dir: Path, vocab_size: int, mode: str) -> tokenizer_kv.TokenizerKV:
    pointer = base_dir / "GGUF_SOURCE"  # models/gguf_base.py: the GGUF file the base was dequantised from
    gguf_path = Path(pointer.read_text().strip()) if pointer.is_file() else None
    if mode == "gguf" or (mode == "auto" and gguf_path is not None and gguf_path.is_file()):
        if gguf_path is None or not gguf_path.is_file():
            raise ExportError(f"no GGUF file to copy the tokenizer from ({pointer} is missing or names no file)")
        tok = tokenizer_kv.from_gguf(gguf_path)
    else:
        tok = tokenizer_kv.from_hf(base_dir, vocab_size)
    if len(tok.tokens) != vocab_size:
        raise ExportError(f"the tokenizer has {len(tok.tokens)} tokens but the embedding has {vocab_size} rows "
                          "(llama.cpp refuses such files)", "export the base model the tokenizer belongs to")
    return tok


class GgufExport:
    """One export, checked and planned with nothing written yet (`prepare_export`); `write` writes it."""

    def __init__(self, spec: ModelSpec, source: TensorSource, adapter: LoraAdapter | None, quant: str,
                 tok: tokenizer_kv.TokenizerKV, chat_template: str | None) -> None:
        self.spec, self.source, self.adapter, self.quant, self.tok = spec, source, adapter, quant, tok
        self.ftype, weight_type = QUANT_TYPES[quant]
        tied = spec.tied or HEAD not in source.entries  # no head of its own: transformers ties it, whatever the config
        split_head = tied and adapter is not None and adapter.changes_tied_pair()
        self.planned = _plan(spec, source, weight_type, split_head)
        self.chat_template = chat_template or tok.chat_template
        self.eos_id = tok.eos_id
        if self.eos_id is None:
            eos = spec.config.get("eos_token_id")
            self.eos_id = eos[0] if isinstance(eos, list) else eos

    def __enter__(self) -> GgufExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()
        if self.adapter is not None:
            self.adapter.close()

    @property
    def bos_token(self) -> str:
        bos = self.tok.values.get(gguf.Keys.Tokenizer.BOS_ID)
        return self.tok.tokens[int(bos.value)] if bos is not None else ""

    @property
    def add_bos(self) -> bool:
        """Whether llama.cpp (and Ollama) put BOS before the prompt by themselves."""
        add = self.tok.values.get(gguf.Keys.Tokenizer.ADD_BOS)
        return bool(add.value) if add is not None else False

    def write(self, out_file: Path, eot_token: str | None = None,
              on_tensor: Callable[[str], None] | None = None) -> ExportReport:
        """Write the file; `eot_token` (the template's end of turn) becomes `tokenizer.ggml.eot_token_id`."""
        started = time.perf_counter()
        out_file = Path(out_file)
        eot_id = self.tok.token_id(eot_token) if eot_token else None
        tmp = out_file.with_name(f".{out_file.name}.{os.getpid()}.tmp")
        # One thread: the per-block torch work (a few rows times a rank-16 matmul) is too small to share, and
        # on a busy 2-core machine two threads made SmolLM2's Q8_0 write take 8 s instead of 1 s.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._write(tmp, out_file.stem, eot_id, on_tensor)
            os.replace(tmp, out_file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            torch.set_num_threads(threads)
        return ExportReport(
            out_file=out_file, quant=self.quant, arch=self.spec.arch_name, file_size=out_file.stat().st_size,
            seconds=time.perf_counter() - started, tensor_types=dict(Counter(p.qtype.name for p in self.planned)),
            tokenizer_source=self.tok.source, lora_weights=len(self.adapter.pairs) if self.adapter else 0,
        )

    def _write(self, path: Path, stem: str, eot_id: int | None, on_tensor: Callable[[str], None] | None) -> None:
        spec, tok = self.spec, self.tok
        writer = _StreamingWriter(path, spec.arch_name)
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(str(spec.config.get("_name_or_path") or stem).rstrip("/").split("/")[-1])
            spec.family.add_hparams(writer, spec)
            writer.add_file_type(self.ftype)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            replaced = {gguf.Keys.Tokenizer.CHAT_TEMPLATE}
            if eot_id is not None:  # the run's end of turn replaces the source's; a template without one keeps it
                replaced.add(gguf.Keys.Tokenizer.EOT_ID)
            for key, value in tok.values.items():  # as read: strings stay raw bytes, so the copy is exact
                if key not in replaced:
                    writer.add_key_value(key, value.value, value.type, value.sub_type)
            if self.chat_template:
                writer.add_chat_template(self.chat_template)
            if self.eos_id is not None and gguf.Keys.Tokenizer.EOS_ID not in tok.values:
                writer.add_eos_token_id(self.eos_id)
            if eot_id is not None:  # llama.cpp stops at EOS, EOT and names it knows; EOT makes the turn's end explicit
                writer.add_eot_token_id(eot_id)
            for p in self.planned:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p in self.planned:
                writer.write_tensor_chunks(_chunks(p, self.source, self.adapter))
                if on_tensor is not None:
                    on_tensor(p.name)
            assert writer.fout is not None
            writer.fout[0].flush()
            os.fsync(writer.fout[0].fileno())  # the rename that publishes the file must not overtake its bytes
        finally:
            writer.close()


def prepare_export(base_dir: Path, quant: str, *, adapter_dir: Path | None = None, chat_template: str | None = None,
                   out_file: Path = Path("model.gguf"), export_f16: str | None = None,
                   tokenizer_from: Literal["auto", "gguf", "hf"] = "auto", instead: str | None = None) -> GgufExport:
    """Check and plan the export of `base_dir` with `adapter_dir` folded in; ExportError for anything unwritable.

    quant: one of QUANT_TYPES (a K-quant is refused with the llama-quantize command for `out_file`, the
    F16 file made as `export_f16` says). chat_template: the template training used; the tokenizer's own
    when None. tokenizer_from: "auto" copies the tokenizer keys from the GGUF named in
    `base_dir/GGUF_SOURCE` when that file exists, else builds them from tokenizer.json. instead: the other
    way to convert the model, named when its architecture is refused.
    """
    base_dir = Path(base_dir)
    quant = resolve_quant(quant, Path(out_file), export_f16)
    spec = load_spec(base_dir, instead)
    source = TensorSource([base_dir / shard for shard in base_shards(base_dir)[0]])
    adapter = None
    try:
        # the text model's tensors under the text model's names (a multimodal class's vision tower is dropped)
        text_tensor = spec.family.text_tensor
        source.entries = {new: entry for name, entry in source.entries.items() if (new := text_tensor(name))}
        adapter = LoraAdapter(Path(adapter_dir)) if adapter_dir is not None else None
        if adapter is not None:
            adapter.rename(text_tensor)
        if EMBED not in source.entries:
            raise ExportError(f"the base `{base_dir}` has no {EMBED}", "is it a complete causal language model?")
        if adapter is not None:
            shapes = {name: entry.shape for name, entry in source.entries.items()}
            shapes.setdefault(HEAD, shapes[EMBED])  # tied: the head reads the embedding's tensor (split off, _plan)
            adapter.check_against(shapes, "export with the base model the adapter was trained on")
        tok = _load_tokenizer(base_dir, source.entries[EMBED].shape[0], tokenizer_from)
        if tok.source == "hf":  # keys copied from a GGUF are already that family's
            spec.family.adjust_tokenizer(tok.values)
        return GgufExport(spec, source, adapter, quant, tok, chat_template)
    except BaseException:
        source.close()
        if adapter is not None:
            adapter.close()
        raise


def export_gguf(base_dir: Path, out_file: Path, quant: str = "q8_0", *, adapter_dir: Path | None = None,
                chat_template: str | None = None, eot_token: str | None = None, overwrite: bool = False,
                on_tensor: Callable[[str], None] | None = None,
                tokenizer_from: Literal["auto", "gguf", "hf"] = "auto") -> ExportReport:
    """`prepare_export` and `write` in one call, for library use; the CLI goes through run_export.py."""
    out_file = Path(out_file)
    if out_file.exists() and not overwrite:
        raise ExportError(f"`{out_file}` already exists", "choose another file name, or pass overwrite=True")
    with prepare_export(base_dir, quant, adapter_dir=adapter_dir, chat_template=chat_template, out_file=out_file,
                        tokenizer_from=tokenizer_from) as export:
        return export.write(out_file, eot_token, on_tensor)
