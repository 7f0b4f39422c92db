"""A small safetensors reader that reads row ranges with `os.pread` instead of memory-mapping the file.

Why not `safetensors.safe_open` (which tools/merge.py uses for the base, a shard at a time): it
memory-maps each shard, and every page it touches stays resident, and counted in the process's RSS,
until the file is closed; reading SmolLM2 tensor by tensor through it grew RSS by the whole 515 MB
file. With `pread` only the rows being converted are ever in memory, so the GGUF exporter's peak RSS
does not grow with the model. LoRA adapter files are read through it too (`lora_file.py`), for the
GGUF export and the folder merge alike. The format is simple enough (u64 header length, JSON header,
raw little-endian data) that reading it directly costs ~80 lines.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype name, shape and absolute byte range of its data."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (one index along dim 0); 1-D tensors have scalar rows."""
        return math.prod(self.shape[1:]) * _DTYPES[self.dtype].itemsize


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse the JSON header of one `.safetensors` file (no tensor data is read)."""
    with open(path, "rb") as f:
        (n_header,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n_header))
    base = 8 + n_header
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ModelError(
                f"{path.name}: tensor {name} has dtype {info['dtype']}, only {sorted(_DTYPES)} are supported",
                "use an unquantised (fp32, fp16 or bf16) Hugging Face checkpoint",
            )
        b, e = info["data_offsets"]
        entries[name] = TensorEntry(path, info["dtype"], tuple(info["shape"]), base + b, base + e)
    return entries


class TensorSource:
    """All tensors of a (possibly sharded) checkpoint, readable by name and row range."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for path in files:
            self.entries.update(read_header(path))
        self._fds: dict[Path, int] = {}

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file descriptor opened by :meth:`read`."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def read(self, name: str, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Rows `[row_start, row_end)` of tensor `name` as a fresh torch tensor in the stored dtype."""
        entry = self.entries[name]
        n_rows = entry.shape[0] if entry.shape else 1
        row_end = n_rows if row_end is None else min(row_end, n_rows)
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        n_bytes = (row_end - row_start) * entry.row_bytes
        buf = bytearray(n_bytes)
        view, done = memoryview(buf), 0
        while done < n_bytes:  # pread may return short reads for very large requests
            chunk = os.preadv(fd, [view[done:]], entry.start + row_start * entry.row_bytes + done)
            if chunk <= 0:
                raise ModelError(f"{entry.file.name}: unexpected end of file reading {name}", "re-save the model")
            done += chunk
        tensor = torch.frombuffer(buf, dtype=_DTYPES[entry.dtype]) if n_bytes else torch.empty(0)
        return tensor.reshape((row_end - row_start, *entry.shape[1:]) if entry.shape else ())
