"""Gemma 3 (text): the converter's `Gemma3Model`, and the parts of llama.cpp's Gemma 3 graph that are fixed in code.

- Gemma's RMSNorm computes x * (1 + w): every norm weight is written as w + 1 (after the LoRA merge);
- sandwich norms (`post_attention_norm`, `post_ffw_norm`) and QK-norm map by name; the embedding scale
  sqrt(hidden) is applied by llama.cpp's graph, so nothing is written for it;
- sliding-window layers: `attention.sliding_window`, and their own RoPE base `rope.freq_base_swa`; the global
  layers' base (and linear scaling, Gemma 3 4B-27B) is `rope.freq_base`. llama.cpp places the global layers at
  every 6th layer unless the file says otherwise: a config whose `layer_types` follow another pattern gets the
  explicit `attention.sliding_window_pattern` array (the converter omits it; llama.cpp reads it);
- llama.cpp scales attention by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B) and reads no
  key for it: a `query_pre_attn_scalar` that disagrees is refused rather than computed differently;
- `final_logit_softcapping` when set; Gemma 2's `attn_logit_softcapping` does not exist in llama.cpp's Gemma 3;
- Gemma's own tokenizer (SentencePiece-style BPE) gets `add_space_prefix` false, as the converter writes it;
- Gemma3ForConditionalGeneration (the published 4B-27B checkpoints) is written as its text model, as the converter
  registers that class on `Gemma3Model` too: the keys from `text_config`, the tensors with `language_model.`
  dropped from their names, the vision tower and projector (and any LoRA on them) left out. The converter writes
  those into a separate mmproj file (`--mmproj`), which image input in llama.cpp needs beside this one.
"""

from __future__ import annotations

from typing import Any

import gguf

from ....errors import ExportError
from .base import Family, ModelSpec, convert_instead

LLAMACPP_SWA_PERIOD = 6  # llama_model_gemma3::load_arch_hparams: load_swa_pattern(ml, 6)
# the multimodal class's parts that go to the mmproj file, in the saved layout and in transformers' module layout
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class Gemma3(Family):
    arch = gguf.MODEL_ARCH.GEMMA3
    hf_archs = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    rope_types = ("default", "linear")

    def text_config(self, config: dict[str, Any]) -> dict[str, Any]:
        text = config.get("text_config")
        if not isinstance(text, dict):
            return config
        # the file's own architecture and name stay: they name the checkpoint, not its text part
        return {**config, **text, "architectures": config.get("architectures"),
                "_name_or_path": config.get("_name_or_path")}

    def text_tensor(self, name: str) -> str | None:
        if name.startswith(VISION_PREFIXES):
            return None
        # `language_model.model.layers.N` (saved) and `model.language_model.layers.N` (an adapter's) -> `model.layers.N`
        return name.replace("language_model.", "")

    def check(self, spec: ModelSpec) -> None:
        super().check(spec)
        cfg = spec.config
        scale_dim = spec.hidden // spec.n_head if spec.n_layer == 62 else spec.head_dim
        scalar = cfg.get("query_pre_attn_scalar") or scale_dim
        if float(scalar) != float(scale_dim):
            raise ExportError(
                f"Gemma 3's query_pre_attn_scalar is {scalar}, but llama.cpp scales attention by 1/sqrt({scale_dim}) "
                "whatever the file says", convert_instead(),
            )
        if cfg.get("attn_logit_softcapping") is not None:
            raise ExportError("attn_logit_softcapping is set, which llama.cpp's Gemma 3 does not apply",
                              convert_instead())
        swa_rope = str(spec.rope_section("sliding_attention").get("rope_type") or "default")
        if swa_rope != "default":
            raise ExportError(f"RoPE scaling {swa_rope!r} on Gemma 3's sliding-window layers is not supported",
                              convert_instead())

    def add_hparams(self, writer: gguf.GGUFWriter, spec: ModelSpec) -> None:
        super().add_hparams(writer, spec)
        cfg = spec.config
        if softcap := cfg.get("final_logit_softcapping"):
            writer.add_final_logit_softcapping(float(softcap))
        if cfg.get("sliding_window_pattern") != 1 and cfg.get("sliding_window"):
            writer.add_sliding_window(int(cfg["sliding_window"]))
            pattern = [kind == "sliding_attention" for kind in cfg.get("layer_types") or []]
            default = [il % LLAMACPP_SWA_PERIOD < LLAMACPP_SWA_PERIOD - 1 for il in range(spec.n_layer)]
            if pattern and pattern != default:
                writer.add_sliding_window_pattern(pattern)

    def offset(self, gguf_name: str) -> float:
        return 1.0 if gguf_name.endswith("norm.weight") else 0.0

    def adjust_tokenizer(self, values: dict[str, gguf.GGUFValue]) -> None:
        """Gemma's SentencePiece tokenizer adds no leading space, where llama.cpp's default for one does."""
        model = values.get(gguf.Keys.Tokenizer.MODEL)
        if model is not None and model.value in ("llama", b"llama"):
            values[gguf.Keys.Tokenizer.ADD_PREFIX] = gguf.GGUFValue(False, gguf.GGUFValueType.BOOL)
