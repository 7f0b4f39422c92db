"""What a model family is to sapo-lite: its classes, its chat markers, its tiny test shape, and its decoder quirks.

One `Family` subclass a file (`llama.py`, `qwen3.py`, ...), each naming only what differs from the Llama
layout this base class describes, as llama.cpp's converter (`conversion/`, one module a family) and
transformers' modular files ("Qwen3 is Qwen2 plus q/k norms") do. Adding a family is adding a file and
one line in `families/__init__.py`; the lean decoder (`decode_plan.py`), the tiny test models
(`models/tiny_families.py`) and the docs read the family from here and nowhere else.

The decoder hooks return the modules of one layer as the lean loop computes with them; anything the loop
would not compute exactly as transformers does is refused by `not_lean` with the reason, and such a model
is decoded by `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class ChatMarkers:
    """The tokenizer's special tokens: the ones a family's template writes, and which of them ends a turn."""

    bos: str | None
    eos: str
    pad: str
    end_of_turn: str
    specials: tuple[str, ...] = ()  # control tokens of the template (one id each, never split)
    added: tuple[str, ...] = ()  # ordinary added tokens kept whole (Qwen3's <think> and </think>)


@dataclass(frozen=True)
class LayerModules:
    """One decoder layer's modules in the order the lean loop applies them (None: not in this family)."""

    input_norm: nn.Module
    qkv: list[nn.Module]  # q, k, v projections, or one fused qkv projection (outputs q | k | v)
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    o: nn.Module
    attention_out_norm: nn.Module | None  # Gemma's sandwich norm after attention
    pre_mlp_norm: nn.Module
    gate_up: list[nn.Module]  # gate and up projections, or one fused gate_up (outputs gate | up)
    down: nn.Module
    mlp_out_norm: nn.Module | None  # Gemma's sandwich norm after the MLP
    act: Any
    attention_scale: float
    rope: str | None  # the key of its RoPE table, for families with one per layer type
    window: int | None  # sliding-window attention: keys further back than this many positions are not seen


class Family:
    """The Llama layout; a family's subclass overrides what differs."""

    name: ClassVar[str]  # the name tests, docs and bench/families.py use
    label: ClassVar[str]  # as users know it
    model_type: ClassVar[str]  # config.model_type
    prefix: ClassVar[str]  # transformers' class-name prefix: {prefix}ForCausalLM, {prefix}DecoderLayer, ...
    template: ClassVar[str]  # sapo_lite/assets/chat-{template}.jinja: the published chat template
    markers: ClassVar[ChatMarkers]
    tiny_config: ClassVar[dict[str, Any]]  # the tiny test model's config, every quirk of the family switched on
    preset: ClassVar[str | None] = None
    aliases: ClassVar[tuple[str, ...]] = ()  # other model_types of the family (a multimodal wrapper's)
    fused_projections: ClassVar[bool] = False  # one qkv_proj and one gate_up_proj (the memory estimate's shapes)
    notes: ClassVar[str] = ""  # what training data and templates need to know about the family (docs)

    # ------------------------------------------------------------ chat

    @classmethod
    def chat_template(cls) -> str:
        return (ASSETS / f"chat-{cls.template}.jinja").read_text()

    # ------------------------------------------------------------ the lean decoder

    def causal_classes(self) -> tuple[str, ...]:
        """The transformers classes of this family that the lean loop decodes."""
        return (f"{self.prefix}ForCausalLM",)

    def language_model(self, lm: nn.Module) -> tuple[nn.Module, Any]:
        """(the decoder stack: embed_tokens, layers, norm, rotary_emb; its config) of a loaded model."""
        return lm.model, lm.config

    def not_lean(self, config: Any) -> str | None:
        """Why the lean loop cannot decode this model exactly (a family-specific switch), else None."""
        return None

    def layer_modules(self, layer: nn.Module, index: int, config: Any) -> LayerModules:
        attention, mlp = layer.self_attn, layer.mlp
        return LayerModules(
            input_norm=layer.input_layernorm, qkv=[attention.q_proj, attention.k_proj, attention.v_proj],
            q_norm=None, k_norm=None, o=attention.o_proj, attention_out_norm=None,
            pre_mlp_norm=layer.post_attention_layernorm, gate_up=[mlp.gate_proj, mlp.up_proj], down=mlp.down_proj,
            mlp_out_norm=None, act=mlp.act_fn, attention_scale=float(attention.scaling), rope=None,
            window=_window(config, index),
        )

    def rotary(self, inner: nn.Module, key: str | None) -> Any:
        """`fn(x, positions) -> (cos, sin)` of RoPE table `key` (a layer's `rope`)."""
        return inner.rotary_emb

    def plain_norm_types(self) -> tuple[str, ...]:
        """Norm classes computing x / rms(x) * w, which the loop may run as `F.rms_norm` in fp32."""
        return (f"{self.prefix}RMSNorm",)


def _window(config: Any, index: int) -> int | None:
    """The sliding window of layer `index`: every layer's (Mistral), or only the sliding layers' (layer_types)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types and layer_types[index] != "sliding_attention"):
        return None
    return int(window)
