"""The data split of a run: which rows train, which validate, which are held out; decided once, recorded.

A run splits its data when it starts: the held-out set first (`data.eval_path`, `data.eval_size`), then
the validation split out of what is left (`data.val_size`), each drawn from its own random stream
(data/streams.py `set_aside`). It records the split in RUN/split.json: the settings that decide it
(`SPLIT_KEYS`) and, for each part, its row count and the SHA-256 of its rows' token ids in order.

A resume splits again from the same settings and data and compares, before the model loads. A change
would train on validation rows, score validation on trained ones, and point the checkpoint's data
position at other examples, so it is refused in one line: the key with its old and new value, or the
part whose rows differ (the data file changed under the run). `check_split_keys` is the part of that
check the CLI makes before anything is read: the overrides against the recorded settings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.schema import HOLDOUT, SPLIT_KEYS, Config
from ..data.examples import Example, TokenizedData, held_out_set
from ..errors import ConfigError, DataError
from ..run.atomic import replace_file
from ..run.layout import RunDir
from .validation import split_validation

PARTS = ("training", "validation", "held_out")


@dataclass
class DataSplit:
    """The rows of each part, and where the held-out set comes from (with the line that says so)."""

    training: list[Example]
    validation: list[Example]
    held_out: list[Example]
    eval_source: str = ""
    eval_note: str | None = None

    def record(self, cfg: Config) -> dict[str, Any]:
        """What RUN/split.json holds: the deciding settings and a fingerprint of each part's rows."""
        return {"keys": split_settings(cfg),
                "rows": {name: fingerprint(getattr(self, name)) for name in PARTS}}


def split_data(cfg: Config, data: TokenizedData, tokenizer: Any) -> DataSplit:
    """Held-out rows, then the validation split out of the rest: the one place a run's rows are divided."""
    rest, held_out, eval_source, eval_note = held_out_set(cfg.data, data, tokenizer, cfg.train.seed)
    training, validation = split_validation(rest, cfg.data.val_size, cfg.train.seed)
    return DataSplit(training, validation, held_out, eval_source, eval_note)


def split_settings(cfg: Config) -> dict[str, Any]:
    return {key: _value(cfg, key) for key in SPLIT_KEYS}


def fingerprint(examples: Sequence[Example]) -> dict[str, Any]:
    """Row count and SHA-256 of the rows' token ids in order: the same rows in the same order, or not."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(example.prompt_ids.astype("<i8").tobytes())
        digest.update(b"|")
        digest.update(example.response_ids.astype("<i8").tobytes())
        digest.update(b"#")
    return {"count": len(examples), "sha256": digest.hexdigest()}


def keep_split(run_dir: Path, cfg: Config, split: DataSplit, resume: bool, is_main: bool) -> None:
    """A new run records its split; a resume checks it is the recorded one (a run from before this
    record existed gets it now). Raises ConfigError or DataError, before the model loads, on a change."""
    path = RunDir(run_dir).split
    record = split.record(cfg)
    if resume and path.is_file():
        recorded = json.loads(path.read_text())
        _refuse_changed_keys(recorded["keys"], cfg)
        for part in PARTS:
            old, new = recorded["rows"][part], record["rows"][part]
            if old != new:
                raise DataError(
                    f"the {part.replace('_', '-')} rows are not the ones this run started with ({_counts(old, new)}): "
                    f"{_source(cfg, part)} changed since, and resuming would train, validate or hold out other "
                    "rows than the run did",
                    "put the run's data back as it was, or start a new run with --out",
                )
        return
    if is_main:
        replace_file(path, json.dumps(record, indent=2) + "\n", run_dir)


def check_split_keys(run_dir: Path, cfg: Config) -> None:
    """Refuse a resume whose config would split the data differently (the CLI calls it before anything loads).

    The recorded settings are those of RUN/split.json; a run from before it existed has only its
    config.yaml, which is what it split with unless a resume of that release changed `data.eval_size`."""
    path = RunDir(run_dir).split
    if path.is_file():
        recorded = json.loads(path.read_text())["keys"]
    else:
        from ..config.sources import load_config

        recorded = split_settings(load_config(None, RunDir(run_dir).config))
    _refuse_changed_keys(recorded, cfg)


def _refuse_changed_keys(recorded: dict[str, Any], cfg: Config) -> None:
    for key in SPLIT_KEYS:
        if key in recorded and recorded[key] != _value(cfg, key):
            old, new = recorded[key], _value(cfg, key)
            raise ConfigError(
                f"`{key}` cannot change when resuming: the run split its data with {key}={old}, and {key}={new} "
                "would change which rows are trained on, validated and held out",
                f"resume without `{key}={new}`, or start a new run with it: `sapo-lite train --out NEW_RUN ...`",
            )


def _value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _source(cfg: Config, part: str) -> str:
    """The file a part's rows come from: the eval file for a held-out set of its own, else the training data."""
    own_file = part == "held_out" and cfg.data.eval_path not in (None, HOLDOUT)
    return f"`{cfg.data.eval_path if own_file else cfg.data.path}`"


def _counts(old: dict[str, Any], new: dict[str, Any]) -> str:
    if old["count"] == new["count"]:
        return f"as many, {old['count']}, but not the same"
    return f"{old['count']} rows then, {new['count']} now"
