"""The run's JSON records: metrics.jsonl read in one place, and numbers made JSON-safe in one place."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or infinity: such values are written as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete step record of a metrics.jsonl, in file order; none when the file does not exist.

    A line that is not a JSON object (the one being written right now, or one cut short by a
    crash) is skipped: a reader may look at a run that is still training.
    """
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records
