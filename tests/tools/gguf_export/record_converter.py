"""Record what llama.cpp's own converter writes for each tiny family model: converter_expectations.json.

    python tests/tools/gguf_export/record_converter.py LLAMA_CPP_CHECKOUT [COMMIT]

runs `convert_hf_to_gguf.py` of that checkout (with its gguf-py) on the models of gguf_families.py at f32, f16
and q8_0, and keeps each file's hyper-parameter keys (every key but the tokenizer's, whose handling is
tokenizer_kv.py's and tested on its own) and each tensor's shape and GGML type. test_gguf_families.py checks the
exporter's files against it, so CI needs no llama.cpp; rerun this when llama.cpp's converter changes.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf_families import FAMILIES, make_family_model, smollm2_tokenizer_dir

HERE = Path(__file__).parent
EXPECTATIONS = HERE / "converter_expectations.json"
QUANTS = ("f32", "f16", "q8_0")
# keys that name the file rather than describe the model, and the tokenizer's
IGNORED_PREFIXES = ("tokenizer.", "GGUF.", "general.name", "general.size_label", "general.file_type")


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str, int]], int]:
    """Every key/value, each tensor's (shape in GGUF order, GGML type name, data offset), and where the data starts.

    Read with struct, not `gguf.GGUFReader`, which makes a numpy view of each of SmolLM2's 98k token and merge
    strings: 3 s a file, against 0.2 s here."""
    with open(path, "rb") as handle:

        def unpack(fmt: str) -> Any:
            return struct.unpack("<" + fmt, handle.read(struct.calcsize("<" + fmt)))[0]

        def value(vtype: int) -> Any:
            if vtype == gguf.GGUFValueType.STRING:
                return handle.read(unpack("Q")).decode("utf-8", errors="replace")
            if vtype == gguf.GGUFValueType.ARRAY:
                sub_type = unpack("I")
                return [value(sub_type) for _ in range(unpack("Q"))]
            return unpack(_SCALARS[vtype])

        assert handle.read(4) == b"GGUF" and unpack("I") == 3
        n_tensors, n_keys = unpack("Q"), unpack("Q")
        keys = {}
        for _ in range(n_keys):
            key = handle.read(unpack("Q")).decode()
            keys[key] = value(unpack("I"))
        tensors = {}
        for _ in range(n_tensors):
            name = handle.read(unpack("Q")).decode()
            shape = [unpack("Q") for _ in range(unpack("I"))]
            qtype = gguf.GGMLQuantizationType(unpack("I")).name
            tensors[name] = (shape, qtype, unpack("Q"))
        alignment = keys.get("general.alignment", 32)
        return keys, tensors, -(-handle.tell() // alignment) * alignment


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(hyper-parameter keys -> values, tensor name -> (shape in GGUF order, GGML type name))."""
    keys, tensors, _ = read_header(path)
    return ({k: v for k, v in keys.items() if not k.startswith(IGNORED_PREFIXES)},
            {name: (shape, qtype) for name, (shape, qtype, _) in tensors.items()})


def read_f32_tensors(path: Path) -> dict[str, np.ndarray]:
    """The F32 tensors of a file, in PyTorch's dimension order."""
    _, tensors, start = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: np.frombuffer(data, np.float32, math.prod(shape), start + offset).reshape(shape[::-1])
            for name, (shape, qtype, offset) in tensors.items() if qtype == "F32"}


def main(llama_cpp: Path, commit: str | None = None) -> None:
    """COMMIT: the checkout's llama.cpp commit where it is no git checkout (llama-cpp-python's vendor/ copy)."""
    commit = commit or subprocess.run(["git", "-C", str(llama_cpp), "rev-parse", "HEAD"], capture_output=True,
                                      text=True).stdout.strip() or "unknown"
    record: dict[str, Any] = {"llama_cpp_commit": commit, "families": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = smollm2_tokenizer_dir(Path(tmp))
        for family in FAMILIES:
            base = make_family_model(Path(tmp) / family, family, tokenizer)
            entry: dict[str, Any] = {}
            for quant in QUANTS:
                out = Path(tmp) / f"{family}.{quant}.gguf"
                done = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(base),
                                       "--outfile", str(out), "--outtype", quant], capture_output=True, text=True)
                if done.returncode != 0:
                    sys.exit(f"the converter failed on {family} at {quant}: {done.stderr[-2000:]}")
                keys, tensors = read_gguf(out)
                if quant == "f32":
                    entry["keys"] = keys
                    entry["shapes"] = {name: shape for name, (shape, _) in tensors.items()}
                entry[quant] = {name: qtype for name, (_, qtype) in tensors.items()}
            record["families"][family] = entry
            print(family, len(entry["shapes"]), "tensors")
    EXPECTATIONS.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)
