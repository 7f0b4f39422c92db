"""The run folder and its lifecycle, for the loop that writes it and the tools that read it.

- `layout.py`: `RunDir`, every path of a run folder; checkpoint listing and adapter lookup;
- `atomic.py`: publishing folders and files so that a kill never leaves half of one;
- `manifest.py`: the file list that says a folder is complete;
- `records.py`: metrics.jsonl read in one place, JSON-safe numbers;
- `lock.py`: one writer at a time; `folders.py`: folders sapo-lite creates and may replace;
- `testhook.py`: a pause point tests kill a run at.
"""

from .layout import RunDir

__all__ = ["RunDir"]
