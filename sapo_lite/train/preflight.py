"""Checks before and after loading the base: settings that do not fit the model or data.

`check_before_loading` runs first, on what the config, the data files and an init adapter's
adapter_config.json tell; the rest runs between loading the base and training on it.

Each turns what would be a tensor-shape traceback, a silently ignored setting or a model trained
on text it cannot read into one line that names both values: LoRA targets against the model's
modules, `model.init_adapter` against the LoRA settings and base, `data.max_len` against the
model's positions, unknown-token share of the data, and the optimizer the device can run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config.schema import Config
from ..errors import ConfigError, ModelError
from ..models.gguf_base import gguf_source
from ..models.lora_file import LoraAdapter, pattern_value
from ..models.tiny import TINY_NAME
from .resolve_files import rows_left_for_training, training_rows, usable_rows

UNKNOWN_WARN_SHARE = 0.5
LLAMA_LINEAR = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # what all-linear adapts


def linear_module_names(base: Any) -> list[str]:
    """Short names of the base's linear layers (`q_proj`, ...), without the output head."""
    import torch

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    return sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head})


def check_lora_targets(cfg: Config, base: Any) -> None:
    """Every name in `lora.target_modules` must match a module of the model (peft matches name suffixes)."""
    targets = cfg.lora.target_modules
    if targets == "all-linear":
        return
    targets = [targets] if isinstance(targets, str) else targets
    names = [name for name, _ in base.named_modules()]
    unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if unknown:
        linear = ", ".join(linear_module_names(base))
        raise ConfigError(
            f"lora.target_modules names {', '.join(f'`{u}`' for u in unknown)}, which "
            f"{'is no module' if len(unknown) == 1 else 'are no modules'} of {cfg.model.name}; "
            f"its linear modules: {linear}",
            "set `lora.target_modules` to some of those (comma-separated), or to all-linear",
        )


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """An init adapter's adapter_config.json; a missing folder, a folder without it, or bad JSON is one error."""
    config_file = folder / "adapter_config.json"
    if not folder.exists():
        raise ModelError(f"model.init_adapter `{folder}` does not exist",
                         "point `model.init_adapter` at an adapter folder such as RUN/adapters/best or "
                         "RUN/adapters/policy")
    if not config_file.is_file():
        raise ModelError(f"model.init_adapter `{folder}` is not a PEFT adapter folder (no adapter_config.json)",
                         "point `model.init_adapter` at a folder such as RUN/adapters/policy")
    try:
        return json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelError(f"model.init_adapter `{folder}`: adapter_config.json is not valid JSON ({exc})",
                         "point `model.init_adapter` at an undamaged adapter folder") from None


def lora_mismatches(adapter: dict[str, Any], lora: Any, ours: list[str] | None) -> tuple[list[str], list[str]]:
    """(what differs, the override that fixes each) between an adapter's config and `lora`; `ours`: the target
    modules the config names (None while they are unknown: `all-linear` before the model is loaded)."""
    found, fixes = [], []
    if adapter.get("r") != lora.r:
        found.append(f"rank {adapter.get('r')} but lora.r={lora.r}")
        fixes.append(f"lora.r={adapter.get('r')}")
    if adapter.get("lora_alpha") != lora.alpha:
        found.append(f"alpha {adapter.get('lora_alpha')} but lora.alpha={lora.alpha}")
        fixes.append(f"lora.alpha={adapter.get('lora_alpha')}")
    theirs = adapter.get("target_modules") or []
    theirs = sorted([theirs] if isinstance(theirs, str) else theirs)
    if ours is not None and theirs != sorted(ours) and theirs != ["all-linear"]:
        found.append(f"target modules {','.join(theirs)} but lora.target_modules={','.join(sorted(ours))}")
        fixes.append(f"lora.target_modules={','.join(theirs)}")
    return found, fixes


def _target_list(targets: list[str] | str) -> list[str]:
    return [targets] if isinstance(targets, str) else list(targets)


def check_init_adapter(cfg: Config, base: Any, model_name: str) -> None:
    """An init adapter must have the config's rank, alpha, targets and base: name both values otherwise."""
    folder = Path(cfg.model.init_adapter)
    adapter = read_adapter_config(folder)
    lora = cfg.lora
    ours = linear_module_names(base) if lora.target_modules == "all-linear" else _target_list(lora.target_modules)
    found, fixes = lora_mismatches(adapter, lora, ours)
    their_base = adapter.get("base_model_name_or_path")
    if their_base and cfg.model.name != TINY_NAME and not _same_model(their_base, model_name, folder):
        found.append(f"base {their_base} but model.name={model_name}")
        fixes.append(f"model.name={their_base}")
    if found:
        raise ConfigError(f"model.init_adapter `{folder}` does not match the config: {'; '.join(found)}",
                          f"train with the adapter's settings: {' '.join(fixes)}")
    # The reader `merge` and the GGUF export use: an adapter they could not fold in is refused before training.
    with LoraAdapter(folder) as init:
        patterned = _patterned_modules(init, lora.r, lora.alpha)
        if patterned:
            raise ConfigError(
                f"model.init_adapter `{folder}` gives modules their own rank or alpha ({'; '.join(patterned)}), "
                f"which lora.r={lora.r} and lora.alpha={lora.alpha} cannot record",
                "re-save the adapter with one rank and alpha for every module (no rank_pattern/alpha_pattern)",
            )
        init.check_against(_module_shapes(base), f"point `model.init_adapter` at an adapter trained on {model_name}")


def _patterned_modules(adapter: LoraAdapter, rank: int, alpha: float) -> list[str]:
    """`down_proj alpha 64 (alpha_pattern)`, ...: modules whose rank or alpha the adapter's patterns set apart."""
    alpha_pattern = adapter.config.get("alpha_pattern") or {}
    apart: dict[str, str] = {}
    for name, pair in sorted(adapter.pairs.items()):
        module = name.removesuffix(".weight")
        module_alpha = pattern_value(alpha_pattern, module, adapter.config.get("lora_alpha", alpha))
        short = module.rsplit(".", 1)[-1]
        if pair.rank != rank:
            apart.setdefault(short, f"{short} rank {pair.rank} (rank_pattern)")
        elif module_alpha != alpha:
            apart.setdefault(short, f"{short} alpha {module_alpha:g} (alpha_pattern)")
    return list(apart.values())


def _module_shapes(base: Any) -> dict[str, tuple[int, ...]]:
    """`NAME.weight` -> the [out, in] (embedding: [vocab, hidden]) shape of every linear and embedding module,
    also of 4-bit layers, whose packed weight tensors have other shapes."""
    import torch

    shapes: dict[str, tuple[int, ...]] = {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Embedding):
            shapes[f"{name}.weight"] = (module.num_embeddings, module.embedding_dim)
        elif isinstance(getattr(module, "in_features", None), int) and isinstance(module, torch.nn.Module):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    return shapes


def check_before_loading(cfg: Config) -> None:
    """Everything the config, the data files and an init adapter's adapter_config.json can tell, checked before
    the model loads (in the time `--dry-run` takes), every problem in one error: a missing or mismatched init
    adapter, a validation split the data cannot hold, a best_metric the data cannot give. What needs the model
    (its module names, its base) is checked once it is loaded (`check_init_adapter`)."""
    problems, fixes = [], []
    if cfg.model.init_adapter:
        folder = Path(cfg.model.init_adapter)
        try:
            adapter = read_adapter_config(folder)
        except ModelError as exc:
            problems.append(exc.message)
            fixes.append(exc.hint)
        else:
            targets = None if cfg.lora.target_modules == "all-linear" else _target_list(cfg.lora.target_modules)
            found, fixed_by = lora_mismatches(adapter, cfg.lora, targets)
            theirs = adapter.get("target_modules")
            if found and targets is None and isinstance(theirs, list) and not set(theirs) >= LLAMA_LINEAR:
                # all-linear is known once the model is; an adapter that lacks some of a Llama-family model's linear
                # layers was not all-linear: name its own targets, which always match it
                found.append(f"target modules {','.join(sorted(theirs))} but lora.target_modules=all-linear "
                             "(the same only if those are all of the model's linear layers)")
                fixed_by.append(f"lora.target_modules={','.join(sorted(theirs))}")
            if found:
                problems.append(f"model.init_adapter `{folder}` does not match the config: {'; '.join(found)}")
                fixes.append(f"train with the adapter's settings: {' '.join(fixed_by)}")
    rows = training_rows(cfg) if cfg.data.val_size else None
    if rows is not None:
        left = rows_left_for_training(cfg, usable_rows(cfg, len(rows)))
        if cfg.data.val_size > left // 2:
            problems.append(f"data.val_size={cfg.data.val_size} would take more than half of the {left} rows of "
                            f"{cfg.data.path} left for training")
            fixes.append(f"set data.val_size={max(1, left // 10)} (a tenth)" if left >= 2 else
                         "set data.val_size=0 train.eval_every=0 (too few rows for a validation split)")
        if cfg.train.best_metric == "val/constraints" and not any(row.get("constraints") for row in rows.rows):
            problems.append(f"train.best_metric=val/constraints, but no row of {cfg.data.path} carries constraints")
            fixes.append("set train.best_metric=auto (val/nll on such data) or val/nll")
    if problems:
        raise ConfigError("; ".join(problems), "; ".join(fixes))


def _same_model(theirs: str, ours: str, adapter: Path) -> bool:
    """The same name, the same folder, or two runs' bases dequantised from the same GGUF file (each run
    converts its own copy into RUN/base_model, so a second stage's base is another folder of equal weights).

    An adapter records its base as the path it was loaded from, relative to where that run was started;
    when that path does not lead anywhere from here, an adapter inside a sapo-lite run (RUN/adapters/X,
    RUN/checkpoints/step-N/adapters/X) is checked against that run's own RUN/base_model.
    """
    if theirs == ours:
        return True
    pa, pb = Path(theirs).expanduser(), Path(ours).expanduser()
    if not pa.exists():
        pa = next((run / "base_model" for run in adapter.resolve().parents if (run / "config.yaml").is_file()), pa)
    if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
        return True
    source_a, source_b = gguf_source(pa), gguf_source(pb)
    return source_a is not None and source_a == source_b


def model_warnings(cfg: Config, model_config: Any) -> list[str]:
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions and cfg.data.max_len > positions:
        return [f"warning: data.max_len={cfg.data.max_len} is longer than the model's max_position_embeddings="
                f"{positions}: positions past {positions} were never trained; set data.max_len={positions}"]
    return []


def data_warnings(unknown_share: float, tokenizer: Any) -> list[str]:
    if unknown_share > UNKNOWN_WARN_SHARE:
        return [f"warning: {unknown_share:.0%} of the data's response tokens are unknown to the tokenizer "
                f"({tokenizer.unk_token}): the model cannot read this text; check the data's language and "
                "encoding, or use a model whose tokenizer covers it"]
    return []


def optimizer_choice(requested: str, device_type: str) -> tuple[str, str | None]:
    """The optimizer to build, and a note when the device cannot run the one asked for."""
    if requested == "auto":
        return ("paged_adamw_8bit" if device_type == "cuda" else "adamw"), None
    if requested == "paged_adamw_8bit" and device_type != "cuda":
        # bitsandbytes would fall back itself, with a UserWarning per parameter group.
        return "adamw", f"optimizer: paged_adamw_8bit needs CUDA; using torch AdamW on {device_type}"
    return requested, None
