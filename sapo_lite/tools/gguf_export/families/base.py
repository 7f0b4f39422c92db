"""What every family shares: the model's hyper-parameters as the exporter reads them (`ModelSpec`) and the
`Family` base class, whose defaults are llama.cpp's converter's `TextModel` (`convert_hf_to_gguf.py`,
`conversion/base.py`); a family module names only where its converter class departs from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from ....errors import ExportError

CONVERTER = "convert_hf_to_gguf.py"


@dataclass
class ModelSpec:
    """The parts of the model's config the exporter needs, read as the converter reads them."""

    hf_arch: str
    family: Family
    config: dict[str, Any]  # `AutoConfig.from_pretrained(...).to_dict()`, transformers' defaults filled in
    n_layer: int
    n_head: int
    n_head_kv: int
    hidden: int
    head_dim: int
    tied: bool
    rope: dict[str, Any]  # the global layers' RoPE parameters (`rope_parameters["full_attention"]` where split)

    @property
    def arch(self) -> gguf.MODEL_ARCH:
        return self.family.arch

    @property
    def arch_name(self) -> str:
        """GGUF architecture string, the prefix of every hyper-parameter key (`llama.block_count`...)."""
        return gguf.MODEL_ARCH_NAMES[self.family.arch]

    @property
    def rope_type(self) -> str:
        return str(self.rope.get("rope_type") or self.rope.get("type") or "default").lower()

    def rope_section(self, layer_type: str) -> dict[str, Any]:
        """`rope_parameters[layer_type]` where the config splits RoPE by layer type (Gemma 3), else {}."""
        return dict((self.config.get("rope_parameters") or {}).get(layer_type) or {})


class Family:
    """A model family's GGUF conversion; the defaults are the converter's `TextModel` for a Llama-like model."""

    arch: gguf.MODEL_ARCH
    hf_archs: tuple[str, ...] = ()
    rope_types: tuple[str, ...] = ("default", "linear", "yarn")  # what `add_hparams` expresses as keys

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The config the text model's keys are read from (a multimodal class's `text_config`)."""
        return config

    def text_tensor(self, name: str) -> str | None:
        """The name the converter gives a checkpoint tensor before mapping it, None for one it drops."""
        return name

    def check(self, spec: ModelSpec) -> None:
        """Refuse a config llama.cpp would load but compute differently from transformers."""
        if spec.rope_type not in self.rope_types:
            raise ExportError(
                f"RoPE scaling type {spec.rope_type!r} of {spec.hf_arch} is not supported by this exporter "
                f"(supported: {', '.join(self.rope_types)})", convert_instead(),
            )

    def add_hparams(self, writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
        """`TextModel.set_gguf_parameters`: the keys llama.cpp's loader reads for every Llama-like architecture."""
        cfg = spec.config
        writer.add_block_count(spec.n_layer)
        writer.add_context_length(cfg.get("max_position_embeddings", 4096))
        writer.add_embedding_length(spec.hidden)
        writer.add_feed_forward_length(cfg["intermediate_size"])
        writer.add_head_count(spec.n_head)
        writer.add_head_count_kv(spec.n_head_kv)
        add_rope_scaling(writer, spec.rope)
        writer.add_rope_freq_base(float(spec.rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        if (swa_theta := spec.rope_section("sliding_attention").get("rope_theta")) is not None:
            writer.add_rope_freq_base_swa(float(swa_theta))
        writer.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        if cfg.get("head_dim") is not None:  # the converter writes it whenever the config has the key
            writer.add_key_length(spec.head_dim)
            writer.add_value_length(spec.head_dim)

    def extra_tensors(self, spec: ModelSpec) -> dict[str, np.ndarray]:
        """Tensors the GGUF needs that the checkpoint does not hold (RoPE factors)."""
        return {}

    def permuted_heads(self, spec: ModelSpec, hf_name: str) -> int | None:
        """Heads whose rows the converter permutes in this tensor (Llama's Q and K), else None."""
        return None

    def offset(self, gguf_name: str) -> float:
        """A constant the converter adds to this tensor after the merge (Gemma's norms), else 0."""
        return 0.0

    def adjust_tokenizer(self, values: dict[str, gguf.GGUFValue]) -> None:
        """Tokenizer keys the converter's `set_vocab` of this family sets beyond the common vocab code."""


def add_rope_scaling(writer: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    """The RoPE scaling keys of `TextModel.set_gguf_parameters` (`llama3` and `longrope` are tensors, elsewhere)."""
    rope_type = str(rope.get("rope_type") or rope.get("type") or "default").lower()
    if rope_type == "linear" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope_type == "yarn" and rope.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            value = rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)
            if value is not None:
                add(float(value))


def convert_instead(run: str = "RUN", out_file: str = "model.gguf", quant: str = "q8_0") -> str:
    """The one-line way round a refusal: a merged folder, converted by llama.cpp's own script."""
    folder = f"{out_file.removesuffix('.gguf')}-hf/"
    outtype = quant if quant in ("f32", "f16", "bf16", "q8_0") else "f16"  # the converter's --outtype choices
    return (f"merge to a folder and convert that with llama.cpp: sapo-lite merge {run} --out {folder} && "
            f"python {CONVERTER} {folder} --outfile {out_file} --outtype {outtype}")
