"""Where settings come from: presets (`presets/`, shipped in the wheel), a YAML file, dotted `key=value` overrides.

`load_config` starts from the defaults, applies the preset, then the user's file, then the
overrides, and finally `validate` reports every out-of-range value at once. Names and types
are checked as each value is set, so a typo is named with the key that was probably meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from ..errors import ConfigError
from .schema import BUNDLED_PREFIX, HOLDOUT, SECTION_NAMES, Config, validate

# ---------------------------------------------------------------- keys and types


def all_keys() -> list[str]:
    """Every dotted key, e.g. `train.lr`."""
    cfg = Config()
    return [f"{s}.{f.name}" for s in SECTION_NAMES for f in dataclasses.fields(getattr(cfg, s))]


# Names other trainers use for the same settings, so their users land on the right key.
ALIASES = {
    "learning_rate": "train.lr", "batch_size": "train.micro_batch", "per_device_train_batch_size": "train.micro_batch",
    "gradient_accumulation_steps": "train.grad_accum", "num_steps": "train.max_steps", "steps": "train.max_steps",
    "max_length": "data.max_len", "max_seq_length": "data.max_len", "max_prompt_length": "data.max_prompt_len",
    "rank": "lora.r", "lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "model_name_or_path": "model.name", "dataset": "data.path", "dataset_name": "data.path",
    "loss_type": "loss.name", "ema": "sapo.ema_decay", "buffer": "sapo.buffer_size",
}


def nearest_key(key: str) -> str | None:
    """The valid key a mistyped one most likely meant."""
    keys = all_keys()
    section, _, field_name = key.rpartition(".")
    if not section and key in SECTION_NAMES:
        return None
    if not section:  # `trainer`, `lr` or `learning_rate`
        near_section = difflib.get_close_matches(key, SECTION_NAMES, n=1, cutoff=0.7)
        if near_section:
            return near_section[0]
    if field_name in ALIASES:
        return ALIASES[field_name]
    same_field = [k for k in keys if k.split(".")[1] == field_name]
    if same_field:
        return same_field[0]
    in_section = [k for k in keys if k.startswith(section + ".")] if section else []
    near = difflib.get_close_matches(key, in_section or keys, n=1, cutoff=0.6)
    return near[0] if near else None


def _unknown_key_error(key: str) -> ConfigError:
    near = nearest_key(key)
    hint = f"did you mean `{near}`?" if near else "run `sapo-lite presets tiny` to see every key"
    return ConfigError(f"unknown config key `{key}`", hint)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        problems = []
        # Text matches a `str` member as it is, unless it is a comma-separated list (`q_proj,v_proj`).
        as_list = isinstance(value, str) and "," in value
        members = sorted(
            (a for a in args if a is not type(None)),
            key=lambda a: (typing.get_origin(a) is list) != as_list if isinstance(value, str) else 0,
        )
        for arg in members:
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                problems.append(exc)
        raise problems[0] if len(problems) == 1 else ConfigError(
            f"{key}={value!r} has the wrong type: expected {_type_name(annotation)}"
        )
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{key}={value!r} is not valid: choose one of {choices}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}={value!r} has the wrong type: expected a list of names")
        return value
    accepts = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, (str, int, float)) and not isinstance(v, bool),
    }
    if annotation is float and isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads `1e-4` as text; the override path reads it as a number too
    check = accepts.get(annotation)
    if check is not None and check(value):
        return annotation(value)
    raise ConfigError(
        f"{key}={value!r} has the wrong type: expected {_type_name(annotation)}",
        f"for example `{key}={_example(annotation)}`",
    )


def _type_name(annotation: Any) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
    if annotation in names:
        return names[annotation]
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return " or ".join(_type_name(a) for a in args) if args else "a list of names"


def _example(annotation: Any) -> str:
    return {bool: "true", int: "8", float: "0.001", str: "NAME"}.get(annotation, "VALUE")


def _field_types(section: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(section))


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key, checking the name and the type."""
    section_name, _, field_name = key.partition(".")
    if section_name not in SECTION_NAMES or not field_name:
        raise _unknown_key_error(key)
    section = getattr(cfg, section_name)
    types = _field_types(section)
    if field_name not in types:
        raise _unknown_key_error(key)
    setattr(section, field_name, _coerce(key, value, types[field_name]))


def merge_mapping(cfg: Config, mapping: dict[str, Any], source: str) -> None:
    """Apply a nested mapping (a preset or config file) onto `cfg`."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source} must be a mapping of sections ({', '.join(SECTION_NAMES)})")
    for section_name, values in mapping.items():
        if section_name not in SECTION_NAMES:
            raise _unknown_key_error(str(section_name))
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section `{section_name}` must be a mapping of keys")
        for field_name, value in values.items():
            set_value(cfg, f"{section_name}.{field_name}", value)


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=1e-4` -> ("train.lr", 0.0001); values are read as YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override `{text}` is not KEY=VALUE", "write it like `train.max_steps=50`")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads `1e-4` as text
    return key.strip(), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------- presets


# Presets live in the top-level `presets/` folder of the source tree, where users browse and copy
# them; the wheel ships that folder inside the package as `sapo_lite/presets/` (pyproject.toml).
SOURCE_PRESETS = Path(__file__).resolve().parents[2] / "presets"


def _preset_dir() -> Any:
    """`presets/` beside the package in a source checkout, else the copy installed with the wheel."""
    if SOURCE_PRESETS.is_dir() and (SOURCE_PRESETS.parent / "pyproject.toml").is_file():
        return SOURCE_PRESETS
    return resources.files("sapo_lite") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> tuple[dict[str, Any], str]:
    """The preset's mapping and its one-line description (the file's first comment)."""
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file() and (name.lower().endswith((".yaml", ".yml")) or Path(name).expanduser().is_file()):
        raise ConfigError(f"`{name}` is a file, and --preset takes the name of a built-in preset",
                          f"a YAML file goes with --config: `--config {name}` (see `sapo-lite presets` for the names)")
    if not path.is_file():
        near = difflib.get_close_matches(name, preset_names(), n=3, cutoff=0.4)
        hint = f"did you mean {', '.join(near)}?" if near else f"presets: {', '.join(preset_names())}"
        raise ConfigError(f"unknown preset `{name}`", hint)
    text = path.read_text()
    first = text.splitlines()[0] if text else ""
    description = first.lstrip("# ").strip() if first.startswith("#") else ""
    return yaml.safe_load(text) or {}, description


def load_config(
    preset: str | None = None, config_file: str | Path | None = None, overrides: list[str] = ()
) -> Config:
    """Defaults <- preset <- config file <- overrides, then validation."""
    cfg = Config()
    if preset:
        mapping, _ = read_preset(preset)
        merge_mapping(cfg, mapping, f"preset `{preset}`")
    if config_file:
        path = Path(config_file)
        merge_mapping(cfg, read_config_file(path), f"config file `{path}`")
        cfg.notes.update(written_notes(path.read_text(encoding="utf-8")))
    for text in overrides:
        set_value(cfg, *parse_override(text))
    hold_out_from_own_data(cfg)
    validate(cfg)
    return cfg


RESOLVED_VALUES = {"data.eval_path": HOLDOUT}  # keys that resolving may set, and the value it sets


def hold_out_from_own_data(cfg: Config) -> None:
    """A bundled eval set (`bundled:NAME-eval`) belongs to its bundled data (`bundled:NAME`): with other data it
    would score a task the model never trained on, so the held-out set comes from that data (`holdout`).

    Decided from the two paths alone, so it is made here, where the config is resolved: `--dry-run` and
    RUN/config.yaml show what the run holds out, and `sapo-lite eval RUN` scores the same rows.
    """
    data = cfg.data
    own = data.eval_path.removesuffix("-eval") if data.eval_path else None
    # `bundled:NAME-pairs` holds the same training prompts as `bundled:NAME`, with rejected answers: one eval set
    if data.eval_path and data.eval_path.startswith(BUNDLED_PREFIX) and own != data.path.removesuffix("-pairs"):
        cfg.notes["data.eval_path"] = (f"{data.eval_path} belongs to {own}: held out from {data.path} instead, "
                                       "into RUN/held_out.jsonl")
        data.eval_path = HOLDOUT


def written_notes(text: str) -> dict[str, str]:
    """The notes `to_yaml` wrote beside keys that resolving set (`  eval_path: holdout  # why`), so a run's
    config.yaml read back on resume keeps saying why. Only those keys: a user's own comments stay comments."""
    notes, section = {}, ""
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":")[0]
        key, _, rest = line.strip().partition(": ")
        value, marked, note = rest.partition("  # ")
        if marked and RESOLVED_VALUES.get(f"{section}.{key}") == value:
            notes[f"{section}.{key}"] = note
    return notes


def read_config_file(path: Path) -> Any:
    """The YAML mapping of a config file; a folder, a missing file or bad YAML is one line with the place."""
    if path.is_dir():
        raise ConfigError(f"--config `{path}` is a folder, not a YAML file", "pass the path of a .yaml file")
    if not path.is_file():
        raise ConfigError(f"config file `{path}` does not exist")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file `{path}` is not UTF-8 text (byte offset {exc.start})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file `{path}` is not valid YAML{where}: {problem}",
                          "YAML wants `section:` lines with indented `key: value` pairs") from None


def config_from_dict(mapping: dict[str, Any]) -> Config:
    cfg = Config()
    merge_mapping(cfg, mapping, "config")
    validate(cfg)
    return cfg


def describe_sources(preset: str | None, config_file: Path | None, overrides: list[str], resume: Path | None) -> str:
    """Where the settings came from, in the order they apply: the line `train` prints first."""
    if resume is not None:
        parts = [f"the run's own {resume / 'config.yaml'}"]
    else:
        parts = [f"preset {preset}" if preset else "built-in defaults (no preset)"]
        if config_file:
            parts.append(str(config_file))
    if overrides:
        parts.append(" ".join(overrides))
    return " + ".join(parts)
