"""The run's before/after evaluation on held-out data: RUN/held-out.json and summary fields, and the rows a
`holdout` run sets aside (RUN/held_out.jsonl), so `sapo-lite eval RUN` scores what the run held out.

On data whose rows carry neither constraints nor answers (free-form chat) an exact match of a greedy answer
with the reference says little: a good answer worded otherwise counts as wrong. There the reference
responses' NLL per token under each role is measured too (lower is better), and reported beside it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.examples import Example, TokenizedData
from ..data.scoring import RoleScore
from ..models.roles import acting_as
from ..run.atomic import replace_file
from ..run.layout import RunDir
from ..sapo.augment import chosen_only_pairs
from ..sapo.pair_logps import pair_logps


def is_free_form(examples: Sequence[Example]) -> bool:
    """Rows with neither constraints nor answers: nothing checks an answer but the reference's own words."""
    return bool(examples) and not any(ex.constraints or ex.answer is not None for ex in examples)


@torch.no_grad()
def reference_nll(model: Any, examples: Sequence[Example], role: str, pad_id: int, batch_size: int = 4,
                  chunk_tokens: int = 256) -> float:
    """Mean over examples of the reference response's NLL per token, as `role` scores it (teacher-forced)."""
    pairs = chosen_only_pairs(examples)
    device = next(model.parameters()).device
    nll: list[float] = []
    with acting_as(model, role):
        for start in range(0, len(pairs), batch_size):
            chosen, _, n_chosen, _ = pair_logps(model, pairs[start : start + batch_size], pad_id, device, chunk_tokens)
            nll += (-chosen / n_chosen.clamp(min=1)).tolist()
    return float(np.mean(nll))


def record_nll(run_dir: Path, role: str, nll: float) -> None:
    """The role's reference NLL beside its other figures in RUN/held-out.json."""
    path = RunDir(run_dir).held_out
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    recorded.setdefault(role, {})["reference_nll"] = round(nll, 4)
    path.write_text(json.dumps(recorded, indent=2))


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
    """summary.json fields for a run evaluated on constraints (overall and per-kind, base and policy), and the
    reference NLL of free-form data."""
    path = RunDir(run_dir).held_out
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    fields: dict[str, Any] = {}
    for role in ("base", "policy"):
        entry = recorded.get(role, {})
        if "reference_nll" in entry:
            fields[f"eval_nll_{role}"] = entry["reference_nll"]
        if "constraints" in entry:
            fields[f"eval_constraints_{role}"] = entry["constraints"]["rate"]
            fields[f"eval_prompts_all_satisfied_{role}"] = entry["prompts_all_satisfied"]["rate"]
            fields[f"eval_per_kind_{role}"] = {kind: t["rate"] for kind, t in entry["per_kind"].items()}
            if "answer_accuracy" in entry:
                fields[f"eval_answer_accuracy_{role}"] = entry["answer_accuracy"]["rate"]
    return fields
