"""Architecture support: which Hugging Face models we convert, their hyper-parameter keys and tensor layout.

Everything here mirrors llama.cpp's converter (`convert_hf_to_gguf.py`: `TextModel.set_gguf_parameters`,
`LlamaModel` and `Qwen2Model`) so that llama.cpp reads our files exactly like its own conversions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ...errors import ExportError

# HF architecture -> (GGUF architecture, whether Q/K rows are permuted for llama.cpp's RoPE layout).
# Llama-family checkpoints store Q/K for HF's "rotate half" RoPE; llama.cpp's LLAMA graph uses the interleaved
# (GPT-J) layout, so the converter permutes their rows. Qwen2 is converted as NEOX-style RoPE: no permutation.
SUPPORTED: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
}
CONVERTER = "convert_hf_to_gguf.py"
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


@dataclass
class ModelSpec:
    """The parts of `config.json` the exporter needs, normalised across transformers 4.x and 5.x."""

    hf_arch: str
    arch: gguf.MODEL_ARCH
    permute_qk: bool
    config: dict[str, Any]
    n_layer: int
    n_head: int
    n_head_kv: int
    hidden: int
    head_dim: int
    tied: bool
    rope: dict[str, Any]

    @property
    def arch_name(self) -> str:
        """GGUF architecture string, the prefix of every hyper-parameter key (`llama.block_count`...)."""
        return gguf.MODEL_ARCH_NAMES[self.arch]


def load_spec(base_dir: Path) -> ModelSpec:
    """Read `config.json` and refuse architectures whose conversion we have not implemented and verified."""
    config_file = base_dir / "config.json"
    if not config_file.is_file():
        raise ExportError(f"the base model `{base_dir}` has no config.json", "is it a Hugging Face model folder?")
    config = json.loads(config_file.read_text())
    hf_arch = (config.get("architectures") or ["<none>"])[0]
    if hf_arch not in SUPPORTED:
        raise ExportError(
            f"GGUF export does not support the architecture {hf_arch}; supported: {', '.join(SUPPORTED)}",
            f"merge to a folder (--format hf) and convert it with llama.cpp's {CONVERTER}",
        )
    arch, permute = SUPPORTED[hf_arch]
    n_head = config["num_attention_heads"]
    hidden = config["hidden_size"]
    # transformers 5 nests RoPE settings in `rope_parameters`; 4.x has `rope_theta` + optional `rope_scaling`
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.get("type", "default"))
    return ModelSpec(
        hf_arch=hf_arch,
        arch=arch,
        permute_qk=permute,
        config=config,
        n_layer=config["num_hidden_layers"],
        n_head=n_head,
        n_head_kv=config.get("num_key_value_heads") or n_head,
        hidden=hidden,
        head_dim=config.get("head_dim") or hidden // n_head,
        tied=bool(config.get("tie_word_embeddings", False)),
        rope=rope,
    )


def add_hparams(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    """Every hyper-parameter key llama.cpp's loader reads for LLAMA/QWEN2, as the converter writes them."""
    cfg = spec.config
    writer.add_block_count(spec.n_layer)
    writer.add_context_length(cfg.get("max_position_embeddings", 4096))
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_freq_base(float(spec.rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    if spec.head_dim != spec.hidden // spec.n_head:  # llama.cpp otherwise derives n_embd / n_head
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
    if spec.arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.set_gguf_parameters adds these two
        writer.add_vocab_size(cfg["vocab_size"])
        writer.add_rope_dimension_count(spec.head_dim)
    _add_rope_scaling(writer, spec)


def _add_rope_scaling(writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
    """RoPE scaling keys; types llama.cpp's LLAMA/QWEN2 graph would silently run differently are refused."""
    rope, rope_type = spec.rope, str(spec.rope["rope_type"]).lower()
    if rope_type == "default":
        return
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    elif rope_type != "llama3":  # llama3 is expressed as the rope_freqs tensor, see extra_tensors()
        raise ExportError(
            f"RoPE scaling type {rope_type!r} is not supported by this exporter",
            f"supported: default, linear, yarn, llama3; merge to a folder (--format hf) and use llama.cpp's "
            f"{CONVERTER}",
        )


def extra_tensors(spec: ModelSpec) -> dict[str, np.ndarray]:
    """Tensors the GGUF needs that the checkpoint does not hold: Llama-3.1 style `rope_freqs` factors."""
    if str(spec.rope["rope_type"]).lower() != "llama3":
        return {}
    # same arithmetic as LlamaModel.generate_extra_tensors in llama.cpp's converter
    rope, dim = spec.rope, spec.head_dim
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    return {name: np.asarray(factors, dtype=np.float32)}


def gguf_name(spec: ModelSpec, name_map: gguf.TensorNameMap, hf_name: str) -> str | None:
    """GGUF name for a checkpoint tensor, or None for tensors llama.cpp does not use."""
    if hf_name.endswith(_SKIPPED_SUFFIXES) or (spec.tied and hf_name == "lm_head.weight"):
        return None  # tied: llama.cpp reuses token_embd as the output matrix when output.weight is absent
    new_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise ExportError(
            f"tensor {hf_name} of {spec.hf_arch} has no GGUF equivalent",
            f"merge to a folder (--format hf) and convert it with llama.cpp's {CONVERTER}",
        )
    return new_name


def heads_of(spec: ModelSpec, hf_name: str) -> int | None:
    """Number of heads whose rows llama.cpp's converter permutes in this tensor (Q and K of Llama), else None."""
    if not spec.permute_qk:
        return None
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return spec.n_head
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return spec.n_head_kv
    return None


def permute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """`LlamaModel.permute` of llama.cpp's converter, for a block of rows that spans `n_heads` whole heads.

    Within each head the rows are reordered from HF's [first halves..., second halves...] to interleaved pairs.
    Because the reorder never crosses a head, a tensor can be permuted block by block.
    """
    shape = rows.shape
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
