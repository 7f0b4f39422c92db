"""The run's before/after evaluation on held-out data: RUN/held-out.json and summary fields, and the rows a
`holdout` run sets aside (RUN/held_out.jsonl), so `sapo-lite eval RUN` scores what the run held out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..data.examples import Example, TokenizedData
from ..data.scoring import RoleScore
from ..run.atomic import replace_file
from ..run.layout import RunDir


def write_held_out_rows(run_dir: Path, data: TokenizedData, held_out: list[Example]) -> None:
    """The held-out examples' rows as they were read, one JSON object a line (`eval --data` reads them back)."""
    rows = [data.rows.rows[example.row_index] for example in held_out]
    text = "".join(json.dumps(dict(row), ensure_ascii=False, default=str) + "\n" for row in rows)
    replace_file(RunDir(run_dir).held_out_rows, text, run_dir)


def record_held_out(run_dir: Path, score: RoleScore) -> None:
    """Add one role's figures to RUN/held-out.json (the base's survive a resume there)."""
    path = RunDir(run_dir).held_out
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded[score.role] = score.to_dict()
    path.write_text(json.dumps(recorded, indent=2))


def held_out_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json fields for a run evaluated on constraints: overall and per-kind, base and policy."""
    path = RunDir(run_dir).held_out
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    fields: dict[str, Any] = {}
    for role in ("base", "policy"):
        entry = recorded.get(role, {})
        if "constraints" in entry:
            fields[f"eval_constraints_{role}"] = entry["constraints"]["rate"]
            fields[f"eval_prompts_all_satisfied_{role}"] = entry["prompts_all_satisfied"]["rate"]
            fields[f"eval_per_kind_{role}"] = {kind: t["rate"] for kind, t in entry["per_kind"].items()}
            if "answer_accuracy" in entry:
                fields[f"eval_answer_accuracy_{role}"] = entry["answer_accuracy"]["rate"]
    return fields
