"""The config, resolved against the files it names, before anything loads: what `train` (and `--dry-run`) prints
as `config:` lines and writes into RUN/config.yaml.

- A second stage (`model.init_adapter` = an adapter of an earlier run, e.g. RUN/adapters/best) trains on that
  run's data and renders with its chat template unless the user names others: the adapter learnt that data in that
  template, and the preset's own data (bundled:instruct) is rarely what a user continuing their own run means.
  Except where the second stage trains on the data's rejected answers (`sapo.pairs=data|mix`, e.g. offline DPO
  from an SFT stage) and the first stage's data has none: then its own preference data stays.
- A preset's `data.val_size` (100 in smollm2-135m-sft) larger than a user's small file allows is scaled down to a
  tenth of the rows left for training; one the user set themselves is refused instead (train/preflight.py), with
  the largest that fits: a value a user typed is never changed behind their back.

Only keys the user did not set (on the command line or in --config) change, and each change carries its note.
"""

from __future__ import annotations

from pathlib import Path

from ..config.schema import HOLDOUT, Config, validate
from ..config.sources import hold_out_from_own_data, parse_override, read_config_file
from ..data.files import Rows, is_local, load_rows, resolve_path
from ..run.layout import RunDir

# What a second stage takes from the run its init adapter comes from, unless the user sets it.
STAGE_ONE_DATA = ("data.path", "data.split", "data.column")
STAGE_ONE_TEMPLATE = "data.chat_template"


def user_set_keys(config_file: Path | None, overrides: list[str]) -> set[str]:
    """The dotted keys the user set themselves: in the --config file or as KEY=VALUE; a preset's are defaults."""
    keys = {parse_override(text)[0] for text in overrides}
    if config_file is not None:
        mapping = read_config_file(Path(config_file))
        if isinstance(mapping, dict):
            keys |= {f"{section}.{key}" for section, values in mapping.items() if isinstance(values, dict)
                     for key in values}
    return keys


def run_of_adapter(folder: str | None) -> Path | None:
    """The run an adapter folder belongs to (RUN/adapters/X, RUN/checkpoints/step-N/adapters/X), else None."""
    if not folder:
        return None
    path = Path(folder).expanduser()  # its parents as written, so the notes name the run as the user does
    return next((parent for parent in path.parents if RunDir(parent).is_run()), None)


def resolve_with_files(cfg: Config, user_keys: set[str]) -> None:
    """Stage two's data and template from stage one, and a preset's val_size fitted to the data; notes say so."""
    stage_one = run_of_adapter(cfg.model.init_adapter)
    if stage_one is not None:
        _inherit_stage_one(cfg, stage_one, user_keys)
    if cfg.data.val_size and "data.val_size" not in user_keys:
        _fit_val_size(cfg)
    validate(cfg)


def _inherit_stage_one(cfg: Config, run: Path, user_keys: set[str]) -> None:
    earlier = RunDir(run).read_config()
    keys = [*STAGE_ONE_DATA] if "data.path" not in user_keys and _can_feed(earlier, cfg, run) else []
    keys.append(STAGE_ONE_TEMPLATE)
    for key in keys:
        section, name = key.split(".")
        theirs = getattr(getattr(earlier, section), name)
        if key in user_keys or theirs == getattr(getattr(cfg, section), name):
            continue
        setattr(getattr(cfg, section), name, theirs)
        cfg.notes[key] = (f"from {run}, whose adapter model.init_adapter continues; set {key} to change it")
    hold_out_from_own_data(cfg)  # a bundled eval set belongs to bundled data, not to the inherited data


def _can_feed(earlier: Config, cfg: Config, run: Path) -> bool:
    """Whether stage one's data can be this run's: a run on the data's rejected answers needs pairs, and data
    read without them (a local or bundled file with no `chosen` + `rejected` columns) has none. Hub data is
    read only when the run starts, so it is taken as it is and judged then."""
    # sapo.pairs first: sapo.sources imports torch, which `--dry-run` otherwise never loads
    if cfg.sapo.pairs not in ("data", "mix") or earlier.data.path == cfg.data.path:
        return True
    from ..data.pairs import reads_pairs
    from ..sapo.sources import reads_rejected  # the loss decides too (SFT reads no rejected answers)

    if not reads_rejected(cfg):
        return True
    rows = training_rows(earlier)
    if rows is None or reads_pairs(rows.columns, earlier.data.column, with_rejected=False):
        return True
    cfg.notes["data.path"] = (f"kept: sapo.pairs={cfg.sapo.pairs} trains on rejected answers, which {run}'s data "
                              f"({earlier.data.path}) has none of; set data.path to choose")
    return False


def training_rows(cfg: Config) -> Rows | None:
    """The training data's rows as read (local files and bundled data only: a hub dataset is read when the run
    starts), for the checks that need no tokenizer."""
    if not is_local(resolve_path(cfg.data.path)):
        return None
    return load_rows(cfg.data.path, cfg.data.split)


def usable_rows(cfg: Config, rows: int) -> int:
    """Rows a run can train on at most: all of them, or `data.max_examples`."""
    return rows if cfg.data.max_examples is None else min(rows, cfg.data.max_examples)


def rows_left_for_training(cfg: Config, rows: int) -> int:
    """Rows after the held-out set (`holdout` takes up to a tenth) is set aside: what a validation split comes from."""
    held_out = min(cfg.data.eval_size, rows // 10) if cfg.data.eval_path == HOLDOUT else 0
    return rows - held_out


def _fit_val_size(cfg: Config) -> None:
    rows = training_rows(cfg)
    if rows is None:
        return
    left = rows_left_for_training(cfg, usable_rows(cfg, len(rows)))
    if cfg.data.val_size <= left // 2 or left < 2:
        return  # fits, or too few rows for any split: preflight says so
    scaled = max(1, left // 10)
    cfg.notes["data.val_size"] = (f"the preset's {cfg.data.val_size} is more than half of the {left} rows of "
                                  f"{cfg.data.path} left for training: a tenth of them")
    cfg.data.val_size = scaled
