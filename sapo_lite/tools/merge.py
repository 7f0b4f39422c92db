"""Fold a LoRA adapter into a full-precision copy of the base, shard by shard.

Never into 4-bit weights: merging into NF4 would re-round every weight. The base is read
from its safetensors shards one shard at a time, so peak RAM is about two shards (the shard and
its serialised copy while it is written) plus the adapter: an 8B model in ~5 GB shards merges
on a 32 GB machine (bench/merge.py measures it). The result is a plain
Hugging Face folder: config, safetensors shards (+ index), tokenizer with chat template,
generation config. `AutoModelForCausalLM.from_pretrained(DIR)` loads it without peft.

`nf4_roundtrip=True` merges into dequantize(quantize_nf4(W)) instead of W: the weights the
adapter was actually trained against. The default merges into the original weights, which
is what most people want to publish.

The adapter is read by `models/lora_file.py`, the reader the GGUF export uses too (per-module
alpha and rank patterns, embedding LoRA, `modules_to_save`). A tied output head is never merged
into the embedding it shares: where the adapter changes the head or the embedding of a tied model,
the folder gets its own `lm_head.weight` (the embedding + the head's delta) and
`tie_word_embeddings: false`, so its logits are those of the base + adapter unmerged; peft's own
`merge_and_unload` writes the head's delta into the shared tensor and changes the input too.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from ..models.lora_file import TIED_HEAD, LoraAdapter
from ..models.roles import DTYPES
from ..run.folders import normal_permissions

CONFIG_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
)
NOT_QUANTISED = ("embed_tokens", "lm_head", "wte", "embed_out")  # bitsandbytes leaves these in full precision


@dataclass
class MergeReport:
    out_dir: Path
    shards: int
    merged_weights: int
    largest_shard_bytes: int
    adapter_bytes: int
    untied_head: bool = False  # a tied head the adapter changes, written as its own lm_head


def nf4_roundtrip(weight: torch.Tensor, double_quant: bool) -> torch.Tensor:
    """dequantize(quantize_nf4(W)): exactly what a bitsandbytes NF4 layer computes with."""
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(weight.contiguous(), quant_type="nf4", compress_statistics=double_quant)
    return dequantize_4bit(packed, state).to(weight.dtype)


def base_shards(base_dir: Path) -> tuple[list[str], dict | None]:
    """Shard file names of a safetensors base folder, and its index (None when unsharded)."""
    index_path = base_dir / "model.safetensors.index.json"
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (base_dir / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise ModelError(
        f"`{base_dir}` has no safetensors weights", "merge reads safetensors; convert the base first"
    )


SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def base_precision(base_dir: Path) -> str:
    """The precision the base's weights are stored in (`bf16` for Llama-3-8B, `fp32` for a dequantised GGUF or the
    tiny base), read from its first floating-point tensor: what a merged folder keeps by default, so folding the
    adapter in neither rounds the base's weights further nor doubles its size."""
    from safetensors import safe_open

    shards, _ = base_shards(base_dir)
    with safe_open(str(base_dir / shards[0]), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            stored = handle.get_slice(key).get_dtype()
            if stored in SAFETENSORS_DTYPES:
                return SAFETENSORS_DTYPES[stored]
    return "fp32"


def resolve_base_dir(name: str) -> Path:
    """A local folder for a hub id (from the local cache) or the folder itself."""
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:  # offline, gated or missing: all end in the same advice
        raise ModelError(
            f"cannot find the base model `{name}` locally: {str(exc).splitlines()[0]}",
            "download it first (huggingface-cli download), or run with network access",
        ) from exc


def merge_adapter(
    base_dir: Path,
    adapter_dir: Path,
    out_dir: Path,
    dtype: str = "bf16",
    roundtrip: bool = False,
    double_quant: bool = True,
    on_shard: Callable[[str], None] | None = None,
    chat_template: str | None = None,
    stop_ids: list[int] | None = None,
) -> MergeReport:
    """Write base + adapter as a plain HF folder, one shard in memory at a time.

    chat_template and stop_ids: what training used (`data.chat_template` and its end-of-turn token),
    written over the base's own, so the folder chats and stops the way the model was trained to."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards, index = base_shards(base_dir)
    shapes, shard_of = {}, {}
    for shard in shards:
        with safe_open(str(base_dir / shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key], shard_of[key] = tuple(handle.get_slice(key).get_shape()), shard
    config = json.loads((base_dir / "config.json").read_text())
    embed, head = TIED_HEAD
    with LoraAdapter(adapter_dir) as adapter:
        adapter.align_to(shapes)  # a multimodal checkpoint (Gemma 3 12B) names its weights in another layout
        # Tied (the config says so, or the checkpoint has no head of its own) and changed: the head is split off.
        untie = adapter.changes_tied_pair() and (head not in shapes or bool(config.get("tie_word_embeddings")))
        new_head = untie and head not in shapes  # written from the embedding's base values, in the embedding's shard
        if new_head:
            if embed not in shapes:
                raise ModelError(f"the adapter changes `{head}`, and the base has neither it nor `{embed}`",
                                 "merge into the base model the run was trained on")
            shapes[head] = shapes[embed]
        adapter.check_against(shapes, "merge into the base model the run was trained on")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        # A fresh hidden sibling, renamed when complete: never a folder of the user's that happens to share a name.
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
        try:
            largest, total_bytes = 0, 0
            for shard in shards:
                tensors: dict[str, torch.Tensor] = {}
                with safe_open(str(base_dir / shard), framework="pt") as handle:
                    metadata = handle.metadata()
                    for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                        weight = handle.get_tensor(key)
                        if roundtrip and weight.dim() == 2 and not any(n in key for n in NOT_QUANTISED):
                            weight = nf4_roundtrip(weight, double_quant)
                        tensors[key] = _merged(weight, key, adapter, DTYPES[dtype])
                        if new_head and key == embed:
                            tensors[head] = _merged(weight, head, adapter, DTYPES[dtype])
                shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
                largest, total_bytes = max(largest, shard_bytes), total_bytes + shard_bytes
                save_file(tensors, str(tmp / shard), metadata=metadata or {"format": "pt"})
                del tensors
                if on_shard:
                    on_shard(shard)
            if index is not None:
                if new_head:
                    index["weight_map"][head] = shard_of[embed]
                index["metadata"] = {**index.get("metadata", {}), "total_size": total_bytes}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            if untie:
                config["tie_word_embeddings"] = False
            _copy_side_files(base_dir, tmp, dtype, config)
            _write_chat_settings(tmp, chat_template, stop_ids)
            normal_permissions(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        merged = len(adapter.targets)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    adapter_bytes = (adapter_dir / "adapter_model.safetensors").stat().st_size
    return MergeReport(out_dir, len(shards), merged, largest, adapter_bytes, untie)


def _merged(weight: torch.Tensor, name: str, adapter: LoraAdapter, dtype: torch.dtype) -> torch.Tensor:
    """`weight` as the adapter leaves weight `name` (replaced, or + its LoRA delta in fp32), in `dtype`."""
    replacement, delta = adapter.replacement(name), adapter.delta(name)
    if replacement is not None:
        weight = replacement
    if delta is not None:
        weight = weight.float() + delta
    return weight.to(dtype) if weight.is_floating_point() else weight


def _copy_side_files(base_dir: Path, out_dir: Path, dtype: str, config: dict) -> None:
    """The base's config (as `config` has it, the dtype set) and its generation and tokenizer files."""
    config = dict(config)
    config.pop("quantization_config", None)
    config["dtype"] = CONFIG_DTYPE_NAMES[dtype]
    config.pop("torch_dtype", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out_dir / name)


def _write_chat_settings(out_dir: Path, chat_template: str | None, stop_ids: list[int] | None) -> None:
    """The training's template as chat_template.jinja (which transformers reads first; the copy in
    tokenizer_config.json goes, so no reader finds two), and its stop tokens as generate()'s EOS."""
    if chat_template:
        (out_dir / "chat_template.json").unlink(missing_ok=True)
        tokenizer_config = out_dir / "tokenizer_config.json"
        if tokenizer_config.is_file():
            settings = json.loads(tokenizer_config.read_text())
            if settings.pop("chat_template", None) is not None:
                tokenizer_config.write_text(json.dumps(settings, indent=2, ensure_ascii=False))
        (out_dir / "chat_template.jinja").write_text(chat_template)
    if stop_ids:
        generation = out_dir / "generation_config.json"
        settings = json.loads(generation.read_text()) if generation.is_file() else {}
        settings["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
        generation.write_text(json.dumps(settings, indent=2))
