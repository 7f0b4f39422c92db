"""Architecture support: which Hugging Face models we convert, read as llama.cpp's converter reads them, and
the tensor layout every family shares. What differs by family lives in `families/`, one module each.

Everything here mirrors llama.cpp's converter (`convert_hf_to_gguf.py`, `TextModel`) so that llama.cpp reads
our files exactly like its own conversions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ExportError
from .families import CONVERTER, FAMILIES, ModelSpec, convert_instead

__all__ = ["CONVERTER", "ModelSpec", "gguf_name", "load_spec", "permute_rows"]
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def read_config(base_dir: Path) -> dict[str, Any]:
    """The config as the converter reads it: transformers' `AutoConfig` with its defaults, else config.json as is."""
    config_file = base_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"the base model `{base_dir}` has no config.json", "is it a Hugging Face model folder?")
    raw = json.loads(config_file.read_text())
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base_dir, trust_remote_code=False, local_files_only=True).to_dict()
    except Exception:  # noqa: BLE001 - a model type this transformers does not know: the converter's fallback too
        config = raw
    config.setdefault("architectures", raw.get("architectures"))
    config["_name_or_path"] = raw.get("_name_or_path")  # AutoConfig's is the folder read; the file's names the model
    return config


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The global layers' RoPE parameters, with the root-level keys mirrored in as `TextModel.__init__` does."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention") or params)
    for key in ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings"):
        if key not in params and config.get(key) is not None:
            params[key] = config[key]
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def load_spec(base_dir: Path, instead: str | None = None) -> ModelSpec:
    """Read the config and refuse architectures whose conversion we have not implemented and verified.

    instead: the command that converts this model another way, for the refusal (a generic one when None).
    """
    config = read_config(base_dir)
    hf_arch = (config.get("architectures") or ["<none>"])[0]
    family = FAMILIES.get(hf_arch)
    if family is None:
        raise ExportError(f"GGUF export does not support the architecture {hf_arch}; supported: {', '.join(FAMILIES)}",
                          instead or convert_instead())
    config = family.text_config(config)
    n_head, hidden = config["num_attention_heads"], config["hidden_size"]
    spec = ModelSpec(
        hf_arch=hf_arch,
        family=family,
        config=config,
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        hidden=hidden,
        head_dim=config.get("head_dim") or hidden // n_head,
        tied=bool(config.get("tie_word_embeddings", False)),
        rope=_rope_parameters(config),
    )
    family.check(spec)
    return spec


def gguf_name(spec: ModelSpec, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """GGUF name for a checkpoint tensor, or None for tensors llama.cpp does not use."""
    if hf_name.endswith(_SKIPPED_SUFFIXES) or (spec.tied and hf_name == "lm_head.weight"):
        return None  # tied: llama.cpp reuses token_embd as the output matrix when output.weight is absent
    new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise ExportError(f"tensor {hf_name} of {spec.hf_arch} has no GGUF equivalent", convert_instead())
    return new_name


def permute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's converter, for a block of rows that spans `n_heads` whole heads.

    Within each head the rows are reordered from HF's [first halves..., second halves...] to interleaved pairs.
    Because the reorder never crosses a head, a tensor can be permuted block by block.
    """
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
