"""What a checkpoint or a final adapter folder holds: a list of its files and their sizes.

The manifest is written last, after every other file is flushed, so a folder whose files all
match their manifest entry is complete; one with a missing, shorter or longer file (a kill
mid-write, a half-finished deletion, a file removed by hand) is not, and is never used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MANIFEST = "manifest.json"


def write_manifest(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    path = folder / MANIFEST
    with path.open("w") as handle:
        json.dump({"files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def has_manifest(folder: Path) -> bool:
    return (folder / MANIFEST).is_file()


def manifest_problems(folder: Path) -> list[str]:
    """What is wrong with `folder` against its manifest; empty when it is complete."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} is damaged"]
    problems = []
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != size:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {size}")
    return problems
