"""One base model, three roles: the trained `policy` adapter, the `ema` generator, the reference.

The base weights (NF4 on CUDA or CPU, or full precision) are loaded once. The policy and
EMA are two LoRA adapters on it; generation switches to the EMA adapter and never merges it into
4-bit weights (that would re-round them); a full-precision base on the CPU generates with the EMA
merged into scratch copies of its weights, the originals untouched (`merged_phase.py`). The DPO
reference is the base with adapters disabled, or a frozen `ref` adapter when training starts from
`model.init_adapter` (with an init adapter, "adapters off" would be the wrong model).

Departures from the official code (three full models, fully fine-tuned):
- LoRA adapters on one (NF4) base instead of three full copies; the EMA averages the LoRA
  tensors A and B, which is close to, not equal to, averaging the weights they stand for.
- the reference is the base with adapters off (or the init adapter), not the EMA copied into
  a third model every 108 steps; `refresh_reference` gives that behaviour on request.
- dropout: the official code switches off every dropout module of policy and reference;
  here LoRA dropout is a setting, 0 in every preset and by default, and the base's own
  dropout is what its config says (0 for Llama and Mistral).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config.schema import LoraSettings, ModelConfig
from ..errors import ModelError
from .weight_layout import store_transposed_for_decoding

POLICY, EMA, REF = "policy", "ema", "ref"
BASE = "base"  # the role with every adapter switched off
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def compute_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.dtype]


def flash_attention_usable(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def attention_implementation(requested: str, device: torch.device) -> str:
    """The kernel to load with: flash-attn falls back to sdpa where it cannot run (callers say so)."""
    if requested == "flash_attention_2" and not flash_attention_usable(device):
        return "sdpa"
    return requested


def check_model_path(name: str) -> None:
    """A name that is clearly a path must exist; otherwise the hub client reports a confusing repo-id error."""
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise ModelError(f"model folder `{name}` does not exist", "check `model.name` (a local folder or a hub id)")


def _not_found(name: str, exc: Exception) -> ModelError:
    return ModelError(
        f"cannot load model `{name}`: {str(exc).splitlines()[0]}",
        "check `model.name`; offline (HF_HUB_OFFLINE=1) only local folders and cached models load",
    )


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    check_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _not_found(name, exc) from exc
    if tokenizer.pad_token_id is None:
        # Padding is always masked out; EOS is a safe stand-in that adds no token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(cfg: ModelConfig, dtype: torch.dtype) -> Any:
    if cfg.quant != "nf4":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as exc:  # a broken bitsandbytes install raises more than ImportError
        raise ModelError(
            f"model.quant=nf4 needs bitsandbytes, which cannot be imported here ({exc})",
            "`pip install bitsandbytes`, or set `model.quant=none`",
        ) from exc
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=cfg.double_quant,
        bnb_4bit_compute_dtype=dtype,
    )


def load_base(cfg: ModelConfig, name: str, device: torch.device) -> torch.nn.Module:
    """The base model in NF4 or full precision, frozen, on `device`."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(cfg, device)
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attention_implementation(cfg.attn_implementation, device),
        "trust_remote_code": cfg.trust_remote_code,
        "quantization_config": quantization_config(cfg, dtype),
    }
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:
        raise _not_found(name, exc) from exc
    except RuntimeError as exc:
        if cfg.quant == "nf4":
            raise ModelError(
                f"loading `{name}` in NF4 failed: {str(exc).splitlines()[0]}",
                "set `model.quant=none` to load it in full precision",
            ) from exc
        raise
    if device.type != "cuda" and cfg.quant != "nf4":
        model.to(device)
    model.requires_grad_(False)
    if device.type == "cpu":
        store_transposed_for_decoding(model)  # same values, streamed faster by the decode loop
    return model


def lora_config(settings: LoraSettings) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type="CAUSAL_LM",
    )


def attach_adapters(
    base: torch.nn.Module, settings: LoraSettings, init_adapter: str | None, gradient_checkpointing: bool
) -> Any:
    """A PeftModel with `policy` (trainable, active) and `ema` (frozen, equal to policy) adapters.

    With `init_adapter`, both start from it and a frozen copy becomes the `ref` adapter.
    """
    from peft import PeftModel, get_peft_model

    # Deliberately no peft.prepare_model_for_kbit_training: it casts every unquantised weight to
    # fp32, which turns Llama-3's 1 GB bf16 embeddings and head into 4 GB; RMSNorm already
    # computes in fp32, and non-reentrant checkpointing needs no input-grad hooks.
    if gradient_checkpointing:
        enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if init_adapter:
        try:
            model = PeftModel.from_pretrained(base, init_adapter, adapter_name=POLICY, is_trainable=True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load model.init_adapter `{init_adapter}`: {str(exc).splitlines()[0]}",
                "point `model.init_adapter` at a PEFT adapter folder (adapter_config.json inside)",
            ) from exc
        model.load_adapter(init_adapter, adapter_name=EMA)
        model.load_adapter(init_adapter, adapter_name=REF)
    else:
        config = lora_config(settings)
        model = get_peft_model(base, config, adapter_name=POLICY)
        model.add_adapter(EMA, config)
        ema_update(model, decay=0.0)  # the EMA starts as an exact copy of the policy
    model.set_adapter(POLICY)
    return model


def adapter_tensors(model: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """LoRA tensors of one adapter, keyed by their name with the adapter name removed."""
    marker = f".{adapter}."
    return {
        name.replace(marker, ".", 1): param
        for name, param in model.named_parameters()
        if "lora_" in name and marker in name
    }


def policy_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return list(adapter_tensors(model, POLICY).values())


@torch.no_grad()
def ema_update(model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * policy, over the LoRA tensors.

    A and B are averaged separately, which is not the average of the product B @ A the
    adapters stand for. With decay 0.5 and an update every step the two stay close (the
    policy moves little per step), and this is what a second full model would cost to avoid.
    """
    policy = adapter_tensors(model, POLICY)
    ema = adapter_tensors(model, EMA)
    names = sorted(policy)
    torch._foreach_lerp_([ema[n] for n in names], [policy[n].to(ema[n].dtype) for n in names], 1.0 - decay)


@torch.no_grad()
def refresh_reference(model: Any, source: str = EMA) -> None:
    """Copy the EMA (or `source`) into the `ref` adapter, created on first use: the official SAPO reference update.

    Cached reference log-probs are stale afterwards; the caller must invalidate them.
    """
    if REF not in model.peft_config:
        model.add_adapter(REF, copy.deepcopy(model.peft_config[EMA]))
        model.set_adapter(POLICY)  # keeps the policy the only trainable adapter
    origin, ref = adapter_tensors(model, source), adapter_tensors(model, REF)
    torch._foreach_copy_([ref[n] for n in sorted(origin)], [origin[n] for n in sorted(origin)])


def copy_policy_to_reference(model: Any) -> None:
    """SPIN's new iteration: the policy as it stands becomes the frozen `ref` adapter (generator and reference)."""
    refresh_reference(model, POLICY)


def training_mode(model: torch.nn.Module) -> None:
    """The policy's forward+backward runs in train mode: activation checkpointing (and dropout) on.

    Set explicitly before every policy update, never left to a previous phase: `from_pretrained`
    leaves the inner transformers model in eval mode while the PeftModel wrapper says
    `training=True`, and transformers checkpoints a layer only when the layer's own `training` is
    True, so without this a run that never went through `acting_as` (SFT without a held-out set,
    every rank above 0, a resumed run between generations) trained without checkpointing.
    """
    model.train()


@contextlib.contextmanager
def acting_as(model: Any, role: str) -> Iterator[Any]:
    """Run the model as `base` (adapters off) or as one adapter, in eval mode: no dropout, no
    activation checkpointing, KV cache usable. The policy is active and trainable again after."""
    was_training = model.training
    model.eval()
    try:
        if role == BASE:
            with model.disable_adapter():
                yield model
        else:
            model.set_adapter(role, inference_mode=True)
            yield model
    finally:
        if POLICY in model.peft_config:
            model.set_adapter(POLICY)
        model.train(was_training)


@contextlib.contextmanager
def reference(model: Any) -> Iterator[Any]:
    """The frozen DPO reference, without gradients: the `ref` adapter when there is one, else the base."""
    with torch.no_grad(), acting_as(model, REF if REF in model.peft_config else BASE):
        yield model
