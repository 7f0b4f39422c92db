"""Typed configuration: one dataclass a section, presets as YAML, dotted overrides.

A preset file mirrors these dataclasses exactly; `load_config` starts from the defaults,
applies the preset, then a user's YAML file, then `key=value` overrides, and finally
`validate` reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

SECTION_NAMES = ("model", "lora", "data", "sapo", "loss", "train")
# Keys a resumed run may change: none of them changes what a checkpoint's tensors mean.
RESUMABLE_KEYS = frozenset({
    "train.max_steps", "train.lr", "train.save_every", "train.keep_checkpoints", "train.max_bad_steps",
    "train.num_threads", "train.report_to", "train.sample_every", "data.eval_size", "data.eval_max_new_tokens",
})


@dataclass
class ModelConfig:
    name: str = "tiny"
    """Hub id or local folder of the base model; `tiny` builds a small Llama locally (no download)."""
    quant: Literal["nf4", "none"] = "nf4"
    """`nf4` loads the base in 4-bit NF4 with bitsandbytes (QLoRA); `none` keeps it in `dtype`."""
    double_quant: bool = True
    """Quantise the NF4 quantisation constants too (saves about 0.4 bits a parameter)."""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Compute dtype; `auto` is bf16 on CUDA and fp32 on CPU."""
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] = "sdpa"
    """Attention kernel; `flash_attention_2` falls back to `sdpa` with a warning when unavailable."""
    gradient_checkpointing: bool = True
    """Recompute activations in backward: far less memory for about a third more compute."""
    init_adapter: str | None = None
    """A PEFT adapter folder to start from; it also becomes the frozen DPO reference."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub repo. Off unless you trust that repo."""


@dataclass
class LoraSettings:
    r: int = 16
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or `all-linear` for every linear layer except the output head."""


@dataclass
class DataConfig:
    path: str = "bundled:tiny-reverse"
    """Hub dataset name, local json/jsonl/parquet file, or `bundled:NAME` for data shipped with sapo-lite."""
    split: str = "train"
    """Dataset split to train on."""
    column: str | None = None
    """Column holding the examples; auto-detected (`chosen`, `messages`, or `prompt`/`response`) when unset."""
    chat_template: str | None = None
    """`chatml`, `zephyr`, a Jinja file, or unset to use the tokenizer's own template."""
    max_len: int = 2048
    """Longest prompt + response in tokens; responses are cut to fit."""
    max_prompt_len: int = 1792
    """Examples whose prompt is longer than this are dropped (and counted in the log)."""
    max_examples: int | None = None
    """Use only the first N usable examples of the dataset (in file order)."""
    eval_path: str | None = None
    """Held-out prompt/response data for the before/after exact-match figure; unset skips it."""
    eval_size: int = 100
    """How many held-out prompts to score."""
    eval_max_new_tokens: int = 64
    """Greedy generation length when scoring held-out prompts."""


@dataclass
class SapoConfig:
    ema_decay: float = 0.5
    """a in ema <- a*ema + (1-a)*policy (the paper's 0.5)."""
    ema_every: int = 1
    """Update the EMA adapter every this many optimizer steps."""
    segment_len: int = 256
    """Tokens of the chosen response the EMA rewrites."""
    buffer_size: int = 2000
    """Capacity of the FIFO replay buffer in pairs (the paper's 2000)."""
    gen_per_step: int = 8
    """New examples turned into pairs (and pushed into the buffer) each optimizer step."""
    gen_batch_size: int = 8
    """Examples generated together in one batched `generate` call."""
    temperature: float = 0.7
    """Sampling temperature of the EMA generator."""
    top_k: int = 50
    """Top-k sampling of the EMA generator."""
    top_p: float = 0.95
    """Nucleus sampling of the EMA generator."""
    static_cache: bool = False
    """Preallocated KV cache for generation; on CUDA transformers then compiles decoding with torch.compile."""


@dataclass
class LossConfig:
    name: Literal["dpo", "orpo"] = "dpo"
    """`dpo` (sigmoid, against the frozen reference) or `orpo` (reference-free)."""
    beta: float = 0.1
    """DPO beta (0.1 in the paper); for ORPO the weight lambda of the odds-ratio term (0.05)."""


@dataclass
class TrainConfig:
    lr: float = 5e-5
    """Peak learning rate."""
    max_steps: int = 1000
    """Optimizer steps to run."""
    micro_batch: int = 2
    """Pairs in one forward/backward."""
    grad_accum: int = 4
    """Micro-batches accumulated into one optimizer step."""
    warmup_steps: int = 10
    """Linear warm-up steps."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA tensors."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    logps_chunk_tokens: int = 256
    """Response positions sent through the output head at once (bounds the vocab-sized logits)."""
    optimizer: Literal["auto", "adamw", "paged_adamw_8bit"] = "auto"
    """`auto` is bitsandbytes' 8-bit paged AdamW on CUDA and torch AdamW on CPU."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log every step to TensorBoard (RUN/tensorboard) or Weights & Biases."""
    sample_every: int = 50
    """With report_to, log a few decoded (prompt, chosen, rejected) pairs every this many steps."""
    save_every: int = 500
    """Write a checkpoint every this many optimizer steps (0: only at the end)."""
    max_bad_steps: int = 3
    """Stop after this many steps in a row with a non-finite loss or gradient (each is skipped)."""
    keep_checkpoints: int = 2
    """How many of the newest checkpoints to keep."""
    seed: int = 42
    """Seed for data order, generation sampling and buffer sampling."""
    num_threads: int | None = None
    """CPU threads for torch; unset keeps torch's default."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    sapo: SapoConfig = field(default_factory=SapoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _preset_dir() -> Any:
    return resources.files("sapo_lite") / "presets"


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def read_preset(name: str) -> tuple[dict[str, Any], str]:
    """The preset's mapping and its one-line description (the file's first comment)."""
    path = _preset_dir() / f"{name}.yaml"
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
        if not path.is_file():
            raise ConfigError(f"config file `{path}` does not exist")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file `{path}` is not valid YAML: {exc}".splitlines()[0]) from exc
        merge_mapping(cfg, mapping, f"config file `{path}`")
    for text in overrides:
        set_value(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def config_from_dict(mapping: dict[str, Any]) -> Config:
    cfg = Config()
    merge_mapping(cfg, mapping, "config")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Collect every out-of-range value and raise once, naming each key."""
    m, lo, d, s, ls, t = cfg.model, cfg.lora, cfg.data, cfg.sapo, cfg.loss, cfg.train
    checks = [
        (lo.r >= 1, "lora.r must be >= 1"),
        (lo.alpha > 0, "lora.alpha must be > 0"),
        (0 <= lo.dropout < 1, "lora.dropout must be in [0, 1)"),
        (d.max_len >= 8, "data.max_len must be >= 8"),
        (0 < d.max_prompt_len < d.max_len, "data.max_prompt_len must be > 0 and < data.max_len"),
        (d.max_examples is None or d.max_examples >= 1, "data.max_examples must be >= 1"),
        (d.eval_size >= 1, "data.eval_size must be >= 1"),
        (0 <= s.ema_decay <= 1, f"sapo.ema_decay must be in [0, 1], got {s.ema_decay}"),
        (s.ema_every >= 1, "sapo.ema_every must be >= 1"),
        (s.segment_len >= 1, f"sapo.segment_len must be >= 1, got {s.segment_len}"),
        (s.buffer_size >= 1, f"sapo.buffer_size must be >= 1, got {s.buffer_size}"),
        (s.gen_per_step >= 1, "sapo.gen_per_step must be >= 1"),
        (s.gen_batch_size >= 1, "sapo.gen_batch_size must be >= 1"),
        (s.temperature > 0, "sapo.temperature must be > 0"),
        (s.top_k >= 0, "sapo.top_k must be >= 0"),
        (0 < s.top_p <= 1, "sapo.top_p must be in (0, 1]"),
        (ls.beta > 0, f"loss.beta must be > 0, got {ls.beta}"),
        (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
        (t.max_steps >= 1, "train.max_steps must be >= 1"),
        (t.micro_batch >= 1, "train.micro_batch must be >= 1"),
        (t.grad_accum >= 1, "train.grad_accum must be >= 1"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.logps_chunk_tokens >= 1, "train.logps_chunk_tokens must be >= 1"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0"),
        (t.save_every >= 0, "train.save_every must be >= 0"),
        (t.sample_every >= 1, "train.sample_every must be >= 1"),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1"),
        (t.max_bad_steps >= 1, "train.max_bad_steps must be >= 1"),
        (t.num_threads is None or t.num_threads >= 1, "train.num_threads must be >= 1"),
        (m.name.strip() != "", "model.name must not be empty"),
    ]
    problems = [msg for ok, msg in checks if not ok]
    if problems:
        raise ConfigError("; ".join(problems), "fix the value in the preset, --config file or override")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
