"""GPU memory estimate of a SAPO run, term by term, and the change that helps most.

Formulas (bytes; b = compute-dtype bytes, 2 for bf16; T = tokens in one training forward =
2 x micro_batch x max_len, chosen and rejected together):

- base weights, NF4 (QLoRA paper, Dettmers et al. 2023): 0.5 byte a quantised parameter plus
  its constants: one fp32 absmax per 64-weight block (4/64 byte), or with double quantisation
  an 8-bit absmax per block plus an fp32 constant per 256 blocks (1/64 + 4/(64*256) byte).
  Embeddings, output head and norms stay in b bytes (bitsandbytes never quantises them).
- adapters: r x (in + out) parameters per adapted linear, kept in fp32 by peft: 4 bytes each,
  for `policy`, `ema` (and `ref` with an init adapter). Gradients: 4 bytes a policy parameter.
- optimizer: AdamW 8 bytes a trainable parameter (two fp32 moments); 8-bit paged AdamW 2 bytes.
- activations of one decoder layer, per token, what autograd saves with frozen base weights
  (checked on CPU by bench/memory_check.py at Llama-3-8B geometry): LoRA-A inputs cast to fp32
  by peft, 4 x (6 H + I); LoRA-dropout masks, 1 byte each on CUDA, (6 H + I) when dropout > 0;
  the MLP's gate, up and activation outputs, 3 I b; RMSNorm inputs in fp32, 2 H x 4; attention
  (q, k, v after RoPE, output), b x (2 Q + 2 KV), Q = heads x head_dim (H for Llama, not for Qwen3,
  Gemma 3 or Mistral-Nemo). Backward adds transient gradients of the MLP
  and of one fp32 LoRA input, 2 I b + 4 I. With gradient checkpointing only each layer's input
  (T x H x b) is kept, plus one layer recomputed in backward.
- log-probs: sapo-lite scores `logps_chunk_tokens` positions at a time: logits, log-softmax and
  their gradient in fp32, 3 x chunk x V x 4 bytes (the plain path would hold 3 x T x V x 4), plus
  the final hidden states T x H x b. The head's backward ends before the first layer is
  recomputed, so the training peak takes the larger of the two, not their sum.
- reference forward of the new pairs (no gradients, 2 x gen_per_step x max_len tokens in one
  forward): the largest live set of one layer, the MLP's gate and up outputs and peft's fp32
  copy of the down projection's input, 2 I b + 4 I a token, plus one chunk of logits.
- shared-prefix pairs (the default layout) put fewer tokens through the model; the estimate
  counts chosen and rejected in full, its upper bound.
- generation KV cache: gen_batch_size x max_len x layers x 2 x KV x b, the most transformers'
  dynamic cache grows to and what the lean decoder preallocates at most (context + segment <= max_len);
  the lean decoder's packed prefill holds fewer tokens than the reference forward below.
  Generation, the reference forward and the backward pass never overlap: the peak takes the
  largest of the three phases.
- CUDA overhead: 0.5 GB context (cuBLAS workspaces, kernels) plus 10% allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..config.schema import Config
from ..errors import ModelError
from .families import BY_MODEL_TYPE
from .gguf_base import gguf_config, is_gguf_base
from .tiny import MODEL_SHAPE, SPECIAL_TOKENS, TINY_NAME, WORDS

GB = 1e9
LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "tie_word_embeddings": False}
MISTRAL_7B = {**LLAMA3_8B, "vocab_size": 32000}
# The families' presets, from each model's config.json (a multimodal one's `text_config`), so that
# `sapo-lite estimate --preset NAME` needs no download.
QWEN3_8B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288,
            "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "tie_word_embeddings": False}
GEMMA3_12B = {"model_type": "gemma3", "vocab_size": 262208, "hidden_size": 3840, "intermediate_size": 15360,
              "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
              "tie_word_embeddings": True, "vision_params": 417_000_000}  # SigLIP tower + projector
GEMMA3_4B = {**GEMMA3_12B, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
             "num_attention_heads": 8, "num_key_value_heads": 4}
PHI4_MINI = {"model_type": "phi3", "vocab_size": 200064, "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 32, "num_attention_heads": 24, "num_key_value_heads": 8, "tie_word_embeddings": True}
MISTRAL_NEMO = {"model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 14336,
                "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                "tie_word_embeddings": False}
KNOWN_ARCHITECTURES = {
    "meta-llama/Meta-Llama-3-8B": LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B,
    "meta-llama/Llama-3.1-8B": LLAMA3_8B,
    "meta-llama/Llama-3.1-8B-Instruct": LLAMA3_8B,
    "mistralai/Mistral-7B-v0.1": MISTRAL_7B,
    "wandb/mistral-7b-zephyr-sft": MISTRAL_7B,
    "Qwen/Qwen3-8B": QWEN3_8B,
    "google/gemma-3-12b-it": GEMMA3_12B,
    "google/gemma-3-4b-it": GEMMA3_4B,
    "microsoft/Phi-4-mini-instruct": PHI4_MINI,
    "mistralai/Mistral-Nemo-Instruct-2407": MISTRAL_NEMO,
}


@dataclass
class Architecture:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool
    head_dim: int = 0  # 0: hidden / heads
    fused: bool = False  # one qkv_proj and one gate_up_proj (Phi-3/4)
    extra_params: int = 0  # linear weights outside the decoder (a vision tower), quantised like the rest

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.dim * self.kv_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block; q's width is heads x head_dim, which is not
        hidden for Qwen3, Gemma 3 or Mistral-Nemo."""
        h, i, kv, q = self.hidden, self.intermediate, self.kv_dim, self.dim * self.heads
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i), "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def architecture(model_name: str) -> Architecture:
    """Shape of a model, found as `train` finds the model, and offline: the tiny one, a GGUF file or named GGUF
    model (its header), a local folder's config.json, a known hub model, or a hub model's cached config.json."""
    if model_name == TINY_NAME:
        values = {**MODEL_SHAPE, "vocab_size": len(SPECIAL_TOKENS) + len(WORDS), "tie_word_embeddings": False}
    elif is_gguf_base(model_name):
        values = gguf_config(model_name)
    elif (Path(model_name).expanduser() / "config.json").is_file():
        values = json.loads((Path(model_name).expanduser() / "config.json").read_text())
    elif model_name in KNOWN_ARCHITECTURES:
        values = KNOWN_ARCHITECTURES[model_name]
    else:
        values = _cached_config(model_name)
    return architecture_from_config(values)


def architecture_from_config(values: dict) -> Architecture:
    """Shape from a model's config.json values (or `model.config.to_dict()`), for Llama-like models (the
    families of models/families/); a multimodal model's language part (`text_config`, Gemma 3)."""
    if isinstance(values.get("text_config"), dict):
        values = {"tie_word_embeddings": values.get("tie_word_embeddings", True), **values,
                  **values["text_config"]}
    try:
        return Architecture(
            vocab=values["vocab_size"], hidden=values["hidden_size"], intermediate=values["intermediate_size"],
            layers=values["num_hidden_layers"], heads=values["num_attention_heads"],
            kv_heads=values.get("num_key_value_heads") or values["num_attention_heads"],
            tied=bool(values.get("tie_word_embeddings", False)), head_dim=int(values.get("head_dim") or 0),
            fused=_fused(values.get("model_type")), extra_params=int(values.get("vision_params", 0)),
        )
    except KeyError as exc:
        raise ModelError(
            f"the memory estimate knows Llama-like models only; this config has no `{exc.args[0]}`",
            "the estimate is skipped; training itself does not need it",
        ) from exc


def _fused(model_type: str | None) -> bool:
    family = BY_MODEL_TYPE.get(model_type)
    return family is not None and family.fused_projections


def _cached_config(model_name: str) -> dict:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        cached = try_to_load_from_cache(model_name, "config.json")  # no network: a model already downloaded
        path = cached if isinstance(cached, str) else hf_hub_download(model_name, "config.json")
        return json.loads(Path(path).read_text())
    except Exception as exc:
        raise ModelError(
            f"cannot read the architecture of `{model_name}`: {str(exc).splitlines()[0]}",
            "point model.name at a local folder with config.json, or download the model first",
        ) from exc


@dataclass
class Estimate:
    base_weights: float
    adapters: float
    gradients: float
    optimizer: float
    activations: float
    activations_without_checkpointing: float
    logits: float
    reference_forward: float
    kv_cache: float
    cuda_overhead: float
    total: float

    def rows(self) -> list[tuple[str, float]]:
        return [
            ("base weights", self.base_weights),
            ("adapters (policy + ema)", self.adapters),
            ("policy gradients", self.gradients),
            ("optimizer state", self.optimizer),
            ("activations (training forward)", self.activations),
            ("log-prob logits (chunked)", self.logits),
            ("reference forward (new pairs)", self.reference_forward),
            ("generation KV cache", self.kv_cache),
            ("CUDA context + fragmentation", self.cuda_overhead),
        ]


def estimate(cfg: Config, arch: Architecture | None = None) -> Estimate:
    """Peak GPU memory in GB for this config, by the formulas in the module docstring."""
    arch = arch or architecture(cfg.model.name)
    b = 4 if cfg.model.dtype == "fp32" else 2
    shapes = arch.linear_shapes()
    linear_params = arch.layers * sum(i * o for i, o in shapes.values()) + arch.extra_params
    if cfg.model.quant == "nf4":
        constants = (1 / 64 + 4 / (64 * 256)) if cfg.model.double_quant else 4 / 64
        linear_bytes = linear_params * (0.5 + constants)
    else:
        linear_bytes = linear_params * b
    embeddings = arch.vocab * arch.hidden * (1 if arch.tied else 2)
    norms = (2 * arch.layers + 1) * arch.hidden
    base = linear_bytes + (embeddings + norms) * b

    targets = _adapted_modules(cfg.lora.target_modules, shapes)
    lora_params = arch.layers * sum(cfg.lora.r * (shapes[m][0] + shapes[m][1]) for m in targets)
    n_adapters = 3 if cfg.model.init_adapter else 2
    adapters = lora_params * 4 * n_adapters
    gradients = lora_params * 4
    optimizer_bytes = 2 if _optimizer(cfg) == "paged_adamw_8bit" else 8
    optimizer = lora_params * optimizer_bytes

    terms = activation_terms(cfg, arch)
    activations = terms["kept"] + (terms["recomputed_layer"] if cfg.model.gradient_checkpointing else 0.0)
    training = gradients + terms["kept"] + max(terms["logits"], terms["backward_transient"])
    kv_cache = cfg.sapo.gen_batch_size * cfg.data.max_len * arch.layers * 2 * arch.kv_dim * b

    resident = base + adapters + optimizer
    peak = resident + max(training, terms["reference_forward"], kv_cache)
    overhead = 0.5 * GB + 0.1 * peak
    return Estimate(
        base_weights=base / GB, adapters=adapters / GB, gradients=gradients / GB, optimizer=optimizer / GB,
        activations=activations / GB, activations_without_checkpointing=terms["without_checkpointing"] / GB,
        logits=terms["logits"] / GB, reference_forward=terms["reference_forward"] / GB, kv_cache=kv_cache / GB,
        cuda_overhead=overhead / GB, total=(peak + overhead) / GB,
    )


def activation_terms(cfg: Config, arch: Architecture) -> dict[str, float]:
    """Bytes of the activation terms in the module docstring, for this config's token counts.

    kept: what stays from the training forward until backward; recomputed_layer: one layer's
    saved tensors when checkpointing recomputes it; backward_transient: the larger of that
    layer's recompute + backward and (without checkpointing) one layer's backward buffers.
    """
    b = 4 if cfg.model.dtype == "fp32" else 2
    h, i, kv, q = arch.hidden, arch.intermediate, arch.kv_dim, arch.dim * arch.heads
    shapes = arch.linear_shapes()
    adapted_in = sum(shapes[m][0] for m in _adapted_modules(cfg.lora.target_modules, shapes))
    tokens = 2 * cfg.train.micro_batch * cfg.data.max_len
    saved = 4 * adapted_in + 3 * i * b + 2 * h * 4 + b * (2 * q + 2 * kv)
    if cfg.lora.dropout > 0:
        saved += adapted_in  # 1-byte masks on CUDA
    backward_buffers = 2 * i * b + 4 * i
    without_checkpointing = arch.layers * tokens * saved
    if cfg.model.gradient_checkpointing:
        kept = arch.layers * tokens * h * b
        backward_transient = tokens * (saved + backward_buffers)
    else:
        kept = without_checkpointing
        backward_transient = tokens * backward_buffers
    chunk = 3 * min(cfg.train.logps_chunk_tokens, tokens) * arch.vocab * 4
    ref_tokens = 2 * cfg.sapo.gen_per_step * cfg.data.max_len
    return {
        "kept": float(kept),
        "kept_per_layer": float(tokens * h * b),
        "recomputed_layer": float(tokens * saved),
        "backward_transient": float(backward_transient),
        "without_checkpointing": float(without_checkpointing),
        "logits": float(chunk + tokens * h * b),
        "reference_forward": float(ref_tokens * (2 * i * b + 4 * i) + min(cfg.train.logps_chunk_tokens, ref_tokens)
                                   * arch.vocab * 4),
    }


def _adapted_modules(target_modules: list[str] | str, shapes: dict[str, tuple[int, int]]) -> list[str]:
    if target_modules == "all-linear":
        return list(shapes)
    names = [target_modules] if isinstance(target_modules, str) else target_modules
    return [m for m in shapes if any(m == n or n.endswith(m) for n in names)]


def _optimizer(cfg: Config) -> str:
    # `auto` resolves to 8-bit paged AdamW on CUDA, the device this estimate is for.
    return "paged_adamw_8bit" if cfg.train.optimizer in ("auto", "paged_adamw_8bit") else "adamw"


def fit_advice(cfg: Config, arch: Architecture, gpu_gb: float) -> str:
    """The mildest single change that makes the run fit `gpu_gb`, or a plain statement that none does."""
    floor_cfg = _with_override(cfg, "model.quant=nf4")
    floor = estimate(floor_cfg, arch)
    floor_gb = floor.base_weights * 1.1 + 0.5  # the weights alone, with the CUDA overhead formula above
    if gpu_gb < floor_gb:
        return (f"a {gpu_gb:g} GB GPU cannot hold even the NF4 base weights of {cfg.model.name} "
                f"({floor.base_weights:.1f} GB plus the CUDA context): no setting makes it fit")
    current = estimate(cfg, arch).total
    tried = []
    for override in _candidate_changes(cfg):
        changed = estimate(_with_override(cfg, override), arch).total
        if changed <= gpu_gb:
            return f"the change that makes it fit: {override} (saves {current - changed:.1f} GB)"
        tried.append((current - changed, override))
    if not tried:
        return "no single change makes it fit"
    saved, override = max(tried)
    return (f"no single change makes it fit; the one that helps most: {override} "
            f"(saves {saved:.1f} GB, still {current - saved - gpu_gb:.1f} GB over)")


def _candidate_changes(cfg: Config) -> list[str]:
    """Single overrides, the ones that change training least first, each knob from mild to strong."""
    t, s, d = cfg.train, cfg.sapo, cfg.data
    changes = []
    if not cfg.model.gradient_checkpointing:
        changes.append("model.gradient_checkpointing=true")
    if cfg.model.quant != "nf4":
        changes.append("model.quant=nf4")
    changes += [f"sapo.gen_batch_size={n}" for n in _halvings(s.gen_batch_size, 1)]
    changes += [f"train.logps_chunk_tokens={n}" for n in _halvings(t.logps_chunk_tokens, 64)]
    # Fewer pairs a micro-batch, more micro-batches: the same pairs per optimizer step.
    changes += [f"train.micro_batch={n} train.grad_accum={t.grad_accum * t.micro_batch // n}"
                for n in _halvings(t.micro_batch, 1)]
    changes += [f"data.max_len={n}" for n in _halvings(d.max_len, 256)]
    return changes


def _halvings(value: int, smallest: int) -> list[int]:
    out = []
    while value // 2 >= smallest:
        value //= 2
        out.append(value)
    return out


def _with_override(cfg: Config, override: str) -> Config:
    from ..config.sources import parse_override, set_value

    changed = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in
                                          ("model", "lora", "data", "sapo", "loss", "train")})
    for part in override.split():
        set_value(changed, *parse_override(part))
    if override.startswith("data.max_len="):
        changed.data.max_prompt_len = min(changed.data.max_prompt_len, changed.data.max_len - 1)
    return changed
