"""Read training rows from where users keep them: a file or folder, a hub dataset, or bundled data.

Local files: JSONL, JSON (a list of rows, or an object holding one list of rows), CSV, TSV and
parquet; a folder of such files, split into `train`/`test`/... by file name. `data.split` selects a
split here as it does on the hub, slices included (`train[:90%]`).

JSON, JSONL, CSV and TSV are read row by row with the standard library, not through `datasets`:
Arrow wants one type per column, so a single `null`, number or content-part list among strings
would fail the whole file, or be cast silently. Read as plain dicts, every row reaches
`data_rows.py`, which names and counts the ones that cannot be used.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..config.schema import BUNDLED_PREFIX
from ..errors import DataError

LOCAL_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")
SPLIT_NAMES = ("train", "test", "validation", "valid", "eval", "dev")


@dataclass
class Rows:
    """Rows as dicts, their column names, and where each row came from (for messages)."""

    rows: Sequence[dict[str, Any]]
    columns: list[str]
    source: str
    places: list[str] | None = None  # "line 7" or "a.jsonl line 7"; None: "row N"
    notes: list[str] = field(default_factory=list)

    def place(self, index: int) -> str:
        return self.places[index] if self.places is not None else f"row {index + 1}"

    def __len__(self) -> int:
        return len(self.rows)


def resolve_path(path: str) -> str:
    """`bundled:NAME` -> the packaged file; anything else is returned unchanged."""
    if not path.startswith(BUNDLED_PREFIX):
        return path
    name = path[len(BUNDLED_PREFIX) :]
    assets = resources.files("sapo_lite") / "assets"
    for suffix in (".jsonl", ".json"):
        candidate = assets / f"{name}{suffix}"
        if candidate.is_file():
            return str(candidate)
    available = sorted(p.name.rsplit(".", 1)[0] for p in assets.iterdir() if p.name.endswith(".jsonl"))
    raise DataError(f"no bundled dataset `{name}`", f"bundled datasets: {', '.join(available)}")


def is_local(path: str) -> bool:
    """A path on disk (with or without `./`), as opposed to a hub dataset name."""
    return (
        Path(path).expanduser().exists()
        or Path(path).suffix in LOCAL_FORMATS
        or path.startswith((".", "/", "~"))
    )


def load_rows(path: str, split: str | None = "train", key: str = "data.path") -> Rows:
    """Every row of the data at `path` (bundled, local file or folder, or hub), for `split`.

    `split=None` (an eval set): the whole of a single file, else the `test` split.
    """
    resolved = resolve_path(path)
    if is_local(resolved):
        rows = _load_local(Path(resolved).expanduser(), split, key)
    else:
        rows = _load_hub(resolved, split, key)
    rows.source = path
    if len(rows) == 0:
        raise DataError(f"dataset `{path}` has no rows", f"point `{key}` at data with examples")
    return rows


# ---------------------------------------------------------------- hub


def _load_hub(name: str, split: str, key: str) -> Rows:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split or "test")
    except Exception as exc:  # datasets raises many types for "not found", offline, bad split
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        offline = any(word in message.lower() for word in ("offline", "connect", "reach"))
        hint = ("no network (or offline mode): use a local jsonl/json/csv/parquet file or folder, or a dataset "
                "already in the Hugging Face cache" if offline else f"check `{key}` and `data.split`")
        raise DataError(f"cannot load dataset `{name}`: {message}", hint) from exc
    return Rows(dataset, list(dataset.column_names), name)


# ---------------------------------------------------------------- local files and folders


def _load_local(path: Path, split: str, key: str) -> Rows:
    if not path.exists():
        raise DataError(f"data file `{path}` does not exist", f"check `{key}`")
    split = split or ("test" if path.is_dir() else "train")
    split_name, slicing = _parse_split(split)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in LOCAL_FORMATS)
        if not files:
            raise DataError(f"`{path}` is a folder without data files",
                            f"`{key}` takes a file or a folder of {', '.join(LOCAL_FORMATS)} files")
        by_split: dict[str, list[Path]] = {}
        for file in files:
            by_split.setdefault(_split_of(file), []).append(file)
    elif path.suffix not in LOCAL_FORMATS:
        raise DataError(f"data file `{path}` has an unknown format", f"use {', '.join(LOCAL_FORMATS)}")
    else:
        by_split = {"train": [path]}
    if split_name not in by_split:
        raise DataError(
            f"data.split={split} does not exist in `{path}`: it has {', '.join(sorted(by_split))}",
            "set `data.split` to one of them" + ("; a single file is the `train` split (slices such as "
                                                 "`train[:90%]` work)" if path.is_file() else ""),
        )
    rows: list[dict[str, Any]] = []
    places: list[str] = []
    columns: dict[str, None] = {}
    notes: list[str] = []
    for file in by_split[split_name]:
        file_rows, file_places, note = _read_file(file)
        if note:
            notes.append(note)
        prefix = f"{file.name} " if path.is_dir() else ""
        for row in file_rows:
            columns.update(dict.fromkeys(row))
        rows += file_rows
        places += [prefix + place for place in file_places]
    if slicing:
        keep = _slice_indices(split, len(rows))
        rows, places = [rows[i] for i in keep], [places[i] for i in keep]
    return Rows(rows, list(columns), str(path), places, notes)


def _parse_split(split: str) -> tuple[str, bool]:
    name = re.split(r"[\[+]", split, maxsplit=1)[0].strip()
    return name, name != split.strip()


def _split_of(file: Path) -> str:
    """`train.jsonl`, `test-00001.parquet`, `data_validation.csv` -> that split; other names are train."""
    words = re.split(r"[-_.]", file.stem.lower())
    return next((word for word in words if word in SPLIT_NAMES), "train")


def _slice_indices(split: str, count: int) -> list[int]:
    from datasets import ReadInstruction

    try:
        parts = ReadInstruction.from_spec(split).to_absolute({_parse_split(split)[0]: count})
    except (ValueError, AssertionError) as exc:
        raise DataError(f"data.split={split} is not a split or slice: {exc}",
                        "write it like `train`, `train[:90%]` or `train[100:]`") from exc
    return [i for part in parts for i in range(part.from_, part.to)]


def _read_file(file: Path) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """Rows of one file, the place of each ("line 7"), and a note on how it was read."""
    if file.stat().st_size == 0:
        raise DataError(f"data file `{file}` is empty", "point `data.path` at a file with examples")
    if file.suffix == ".parquet":
        import datasets

        try:
            table = datasets.load_dataset("parquet", data_files=str(file), split="train")
        except Exception as exc:
            raise DataError(f"cannot read `{file}`: {str(exc).splitlines()[0]}") from exc
        return table.to_list(), [f"row {i + 1}" for i in range(len(table))], None
    text = read_utf8(file)
    if file.suffix in (".csv", ".tsv"):
        return _read_delimited(file, text)
    return _read_json(file, text)


def read_utf8(file: Path) -> str:
    """The file's text; bytes that are not UTF-8 are one error naming the byte offset and line."""
    data = file.read_bytes()
    try:
        return codecs.decode(data, "utf-8-sig")
    except UnicodeDecodeError as exc:
        start = exc.start + (3 if data.startswith(codecs.BOM_UTF8) else 0)
        line = data.count(b"\n", 0, start) + 1
        raise DataError(
            f"`{file}` is not UTF-8 text: byte 0x{data[start]:02x} at byte offset {start} (line {line})",
            "re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`",
        ) from None


def _read_delimited(file: Path, text: str) -> tuple[list[dict[str, Any]], list[str], str | None]:
    delimiter = "\t" if file.suffix == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter=delimiter)
    rows, places = [], []
    try:
        for row in reader:
            row.pop(None, None)  # cells beyond the header row
            rows.append(row)
            places.append(f"line {reader.line_num}")
    except csv.Error as exc:
        raise DataError(f"`{file}` line {reader.line_num} is not valid {file.suffix[1:].upper()}: {exc}",
                        "fix or remove that line") from exc
    return rows, places, None


def _read_json(file: Path, text: str) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """JSON Lines, or one JSON document: a list of rows or an object holding one list of rows."""
    first = text.lstrip()[:1]
    if first == "[" or (first == "{" and file.suffix == ".json"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            if first == "[" or exc.msg != "Extra data":  # "Extra data" after one object: JSON Lines
                raise DataError(f"`{file}` is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                                "fix the file, or write one JSON object a line (.jsonl)") from exc
        else:
            return _rows_of_document(file, document)
    rows, places = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"`{file}` line {number} is not valid JSON ({exc.msg})", "fix or remove that line") from exc
        if not isinstance(row, dict):
            raise DataError(f"`{file}` line {number} is a JSON {type(row).__name__}, not an object with columns",
                            "write one JSON object a line, e.g. {\"prompt\": ..., \"response\": ...}")
        rows.append(row)
        places.append(f"line {number}")
    return rows, places, None


def _rows_of_document(file: Path, document: Any) -> tuple[list[dict[str, Any]], list[str], str | None]:
    note = None
    if isinstance(document, dict):
        lists = {k: v for k, v in document.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        if len(lists) > 1:
            raise DataError(f"`{file}` is a JSON object with lists under {', '.join(f'`{k}`' for k in lists)}: "
                            "cannot tell which holds the rows",
                            "keep one list of row objects in it, or write the rows as a list (or .jsonl)")
        if lists:
            (name, document), = lists.items()
            note = f"rows from key `{name}`"
        else:  # one row on its own (JSON Lines with a single line)
            document = [document]
    if not isinstance(document, list):
        raise DataError(f"`{file}` holds a JSON {type(document).__name__}, not rows",
                        "write a list of row objects, or one object a line (.jsonl)")
    bad = next((i for i, row in enumerate(document) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"`{file}` row {bad + 1} is a JSON {type(document[bad]).__name__}, not an object",
                        "each row must be an object with columns")
    return document, [f"row {i + 1}" for i in range(len(document))], note
