"""What the lean decode loop reads: a model's weights laid out per layer, or why it cannot be.

`build_plan(model)` walks a model of a known family (plain, or a PeftModel with its active LoRA
adapter) once per generation call and returns the tensors `decoding.py` computes with: per layer the
norms, the q/k/v, o, gate/up and down projections grouped by the input they share (or the fused ones a
family has), each with its dense base weight (or its quantised base module, called as is) and the
active adapter's A, B and scaling, unmerged. What differs between families (q/k norms, sandwich norms,
fused projections, RoPE tables per layer type, sliding windows) the family's file says
(`families/`); the loop reads it from the plan, never from the family. Two things are copied: the A
matrices of a group, stacked, and an output head no adapter touches, into oneDNN's packed layout
(`matmul.packed_copy`, made once and kept while that weight is unchanged; a head with a LoRA, tied or
not, is read as it stands, or as the merged phase's own weight, never the embedding's).

Anything the loop does not reproduce exactly refuses the plan (`NotLeanDecodable`, with the reason), and
generation then runs through transformers' `generate` as before: a family sapo-lite does not know, a
family switch it does not compute (`Family.not_lean`: Gemma's soft-capping), a module type other than the
expected ones (a DoRA or biased LoRA, an adapted embedding, a base that is neither a float `nn.Linear`
nor bitsandbytes' 4-bit linear), several active adapters, train mode (dropout), a RoPE variant that
rescales with the sequence length, or a model generation config that adds logits processors (a
repetition penalty, ...).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .families import FAMILIES, Family, family_of
from .matmul import packed_copy
from .weight_layout import side_by_side

# Generation-config fields that make `generate` add a logits processor the lean sampler does not
# apply; each is compared with transformers' default.
PROCESSOR_FIELDS = (
    "repetition_penalty", "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length",
    "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "renormalize_logits", "guidance_scale", "watermarking_config", "diversity_penalty", "remove_invalid_values",
    "top_h",  # transformers 5: entropy-based truncation (TopHLogitsWarper)
)


class NotLeanDecodable(Exception):
    """The model has something the lean loop would not compute exactly as transformers does."""


@dataclass
class Projection:
    """One linear layer: a dense weight (+ bias) read directly, or an opaque quantised module; plus
    the active LoRA adapter's (A [r, in], B [out, r], scaling) when it is applied unmerged."""

    out_features: int
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    module: nn.Module | None = None
    lora: tuple[torch.Tensor, torch.Tensor, float] | None = None


@dataclass
class ProjectionGroup:
    """Projections that read the same input (q/k/v, gate/up), outputs side by side in one tensor.

    When the base weights lie side by side in one buffer (`weight_layout.py`), `joined` is that
    buffer as one weight: the group's base projection is one matmul. When every part has an
    adapter, their A matrices are stacked so the group's LoRA input projection is one matmul
    (x @ cat(A)^T), and each part adds its own B @ (rows of that)."""

    parts: list[Projection]
    packed: torch.Tensor | None = None  # oneDNN's own layout of a frozen, unadapted weight (the head)
    width: int = 0
    joined: torch.Tensor | None = None
    stacked_a: torch.Tensor | None = None
    rank_slices: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.width = sum(p.out_features for p in self.parts)
        if all(p.weight is not None and p.bias is None for p in self.parts):
            self.joined = side_by_side([p.weight for p in self.parts])
        loras = [p.lora for p in self.parts]
        if all(lora is not None for lora in loras) and len({lora[0].dtype for lora in loras}) == 1:
            self.stacked_a = torch.cat([lora[0] for lora in loras]) if len(loras) > 1 else loras[0][0]
            start = 0
            for lora in loras:
                self.rank_slices.append((start, start + lora[0].shape[0]))
                start += lora[0].shape[0]


@dataclass
class LayerPlan:
    """One layer as the loop computes it (`families.LayerModules`, with projections resolved)."""

    input_norm: Any
    q_norm: Any  # None, or a norm over each head's dimensions before RoPE (Qwen3, Gemma 3)
    k_norm: Any
    attention_out_norm: Any  # None, or Gemma's norm of the attention output before the residual add
    pre_mlp_norm: Any
    mlp_out_norm: Any  # None, or Gemma's norm of the MLP output before the residual add
    qkv: ProjectionGroup
    o: ProjectionGroup
    gate_up: ProjectionGroup
    down: ProjectionGroup
    act: Any
    attention_scale: float
    rope: str | None  # key of its RoPE table in DecodePlan.rotaries
    window: int | None  # sliding window: a query sees the keys of the last `window` positions, itself included

    @property
    def intermediate(self) -> int:
        return self.gate_up.width // 2  # gate | up, as separate projections or one fused one


@dataclass
class DecodePlan:
    embed: nn.Embedding  # called as is (Gemma's scales its output by sqrt(hidden))
    rotaries: dict[str | None, Any]  # `fn(x, positions) -> (cos, sin)` per layer's `rope` key
    final_norm: Any
    head: ProjectionGroup
    layers: list[LayerPlan]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden: int
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device


def why_not_lean(model: nn.Module) -> str | None:
    """None when the lean loop can decode with `model` as it stands, else the reason it cannot."""
    try:
        build_plan(model)
    except NotLeanDecodable as exc:
        return str(exc)
    return None


def plan_for(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> DecodePlan | None:
    """The lean loop's plan of `model` for these prompts, or None where `generate` must decode them
    (a model it does not cover, or an empty prompt)."""
    if not all(len(p) for p in prompts):
        return None
    try:
        return build_plan(model)
    except NotLeanDecodable:
        return None


def build_plan(model: nn.Module) -> DecodePlan:
    """The plan of `model` with its active adapter; raises NotLeanDecodable (see the module docstring)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = family_of(getattr(lm, "config", None))
    if family is None or type(lm).__name__ not in family.causal_classes():
        known = ", ".join(name for f in FAMILIES.values() for name in f.causal_classes())
        raise NotLeanDecodable(f"the lean decoder supports {known}, not {type(lm).__name__}")
    inner, config = family.language_model(lm)
    if lm.training:
        raise NotLeanDecodable("the model is in train mode (dropout)")
    for rope_type in _rope_types(config):
        if "dynamic" in rope_type or rope_type == "longrope":
            raise NotLeanDecodable(f"RoPE `{rope_type}` rescales with the sequence length")
    reason = family.not_lean(config)
    if reason:
        raise NotLeanDecodable(reason)
    _check_generation_config(lm)
    embedding_types = ("Embedding", f"{family.prefix}TextScaledWordEmbedding")
    if not isinstance(inner.embed_tokens, nn.Embedding) or type(inner.embed_tokens).__name__ not in embedding_types:
        raise NotLeanDecodable(f"the embedding is a {type(inner.embed_tokens).__name__}")
    layers = [_layer_plan(family, layer, index, config)
              for index, layer in enumerate(inner.layers[: config.num_hidden_layers])]
    return DecodePlan(
        embed=inner.embed_tokens,
        rotaries={layer.rope: family.rotary(inner, layer.rope) for layer in layers},
        final_norm=_norm(inner.norm, family),
        head=_head(lm.lm_head),
        layers=layers,
        n_heads=int(config.num_attention_heads),
        n_kv_heads=int(config.num_key_value_heads),
        head_dim=int(inner.layers[0].self_attn.head_dim),
        hidden=int(config.hidden_size),
        dtype=inner.embed_tokens.weight.dtype,
    )


def _rope_types(config: Any) -> list[str]:
    """Every RoPE type of the model: one, or one per layer type (Gemma 3's `rope_parameters` by type)."""
    params = getattr(config, "rope_parameters", None) or {}
    tables = [p for p in params.values() if isinstance(p, dict)] or [params]
    return [table.get("rope_type", "default") for table in tables]


def _head(module: nn.Module) -> ProjectionGroup:
    """The output head; one no adapter touches (not a LoRA layer, so never merged into) is frozen for the
    whole run, and the loop reads oneDNN's packed copy of it (`matmul.packed_copy`)."""
    head = _projection(module)
    frozen = not _is_lora_layer(module) and head.weight is not None and head.bias is None
    return ProjectionGroup([head], packed=packed_copy(head.weight) if frozen else None)


def _check_generation_config(lm: nn.Module) -> None:
    from transformers import GenerationConfig

    ours, default = getattr(lm, "generation_config", None), GenerationConfig()
    if ours is None:
        return
    extra = [name for name in PROCESSOR_FIELDS if getattr(ours, name, None) != getattr(default, name, None)]
    if extra:
        raise NotLeanDecodable(f"the model's generation config sets {', '.join(extra)}")


def _layer_plan(family: Family, layer: nn.Module, index: int, config: Any) -> LayerPlan:
    attention, mlp = layer.self_attn, layer.mlp
    for module, kind in ((layer, "DecoderLayer"), (attention, "Attention"), (mlp, "MLP")):
        if type(module).__name__ != f"{family.prefix}{kind}":
            raise NotLeanDecodable(f"unexpected module {type(module).__name__} (expected {family.prefix}{kind})")
    modules = family.layer_modules(layer, index, config)

    def norm(module: nn.Module | None) -> Any:
        return None if module is None else _norm(module, family)

    return LayerPlan(
        input_norm=norm(modules.input_norm), q_norm=norm(modules.q_norm), k_norm=norm(modules.k_norm),
        attention_out_norm=norm(modules.attention_out_norm), pre_mlp_norm=norm(modules.pre_mlp_norm),
        mlp_out_norm=norm(modules.mlp_out_norm),
        qkv=ProjectionGroup([_projection(m) for m in modules.qkv]),
        o=ProjectionGroup([_projection(modules.o)]),
        gate_up=ProjectionGroup([_projection(m) for m in modules.gate_up]),
        down=ProjectionGroup([_projection(modules.down)]),
        act=modules.act, attention_scale=modules.attention_scale, rope=modules.rope, window=modules.window,
    )


def _norm(module: nn.Module, family: Family) -> Any:
    """The model's RMSNorm; a plain one (x / rms * w) in fp32 as `F.rms_norm` (the same values, one kernel
    instead of five); any other (Gemma's x * (1 + w)) called as is."""
    if type(module).__name__ != f"{family.prefix}RMSNorm":
        raise NotLeanDecodable(f"unexpected norm {type(module).__name__}")
    if module.weight.dtype != torch.float32 or type(module).__name__ not in family.plain_norm_types():
        return module
    weight, eps, shape = module.weight, float(module.variance_epsilon), (module.weight.shape[0],)
    return lambda x: F.rms_norm(x, shape, weight, eps) if x.dtype == torch.float32 else module(x)


def _is_lora_layer(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def _projection(module: nn.Module) -> Projection:
    """A projection with its base and, unless disabled or merged, its one active LoRA adapter."""
    lora = None
    base = module
    if _is_lora_layer(module):
        base = module.get_base_layer()
        if not (module.merged or module.disable_adapters):
            lora = _active_lora(module)
        elif module.merged and module.disable_adapters:
            raise NotLeanDecodable("adapters are disabled on a merged layer")
    if type(base) is nn.Linear and base.weight.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return Projection(base.out_features, weight=base.weight, bias=base.bias, lora=lora)
    if type(base).__name__ == "Linear4bit":  # bitsandbytes NF4: its own dequantising forward
        return Projection(base.out_features, module=base, lora=lora)
    raise NotLeanDecodable(f"unexpected linear layer {type(base).__name__}")


def _active_lora(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    active = [name for name in module.active_adapters if name in module.lora_A]
    if not active:
        return None
    if len(active) > 1:
        raise NotLeanDecodable(f"{len(active)} adapters are active at once")
    name = active[0]
    if (name in (getattr(module, "lora_variant", None) or {}) or getattr(module, "fan_in_fan_out", False)
            or module.lora_B[name].bias is not None or type(module.lora_A[name]) is not nn.Linear):
        raise NotLeanDecodable(f"adapter `{name}` is not a plain LoRA (DoRA, a LoRA bias, ...)")
    return module.lora_A[name].weight, module.lora_B[name].weight, float(module.scaling[name])
