"""Record what llama.cpp's own converter writes for each tiny family model: converter_expectations.json.

    python tests/tools/gguf_export/record_converter.py LLAMA_CPP_CHECKOUT [COMMIT]

runs `convert_hf_to_gguf.py` of that checkout (with its gguf-py) on the models of gguf_families.py at f32, f16
and q8_0, and keeps each file's hyper-parameter keys (every key but the tokenizer's, whose handling is
tokenizer_kv.py's and tested on its own) and each tensor's shape and GGML type. test_gguf_families.py checks the
exporter's files against it, so CI needs no llama.cpp; rerun this when llama.cpp's converter changes.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import gguf
from gguf_families import FAMILIES, make_family_model, smollm2_tokenizer_dir

HERE = Path(__file__).parent
EXPECTATIONS = HERE / "converter_expectations.json"
QUANTS = ("f32", "f16", "q8_0")
# keys that name the file rather than describe the model, and the tokenizer's
IGNORED_PREFIXES = ("tokenizer.", "GGUF.", "general.name", "general.size_label", "general.file_type")


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """(hyper-parameter keys -> values, tensor name -> (shape in GGUF order, GGML type name))."""
    reader = gguf.GGUFReader(path)
    keys = {f.name: f.contents() for f in reader.fields.values() if not f.name.startswith(IGNORED_PREFIXES)}
    tensors = {t.name: ([int(n) for n in t.shape], t.tensor_type.name) for t in reader.tensors}
    return keys, tensors


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
