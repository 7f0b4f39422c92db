"""`sapo-lite merge RUN --out folder` for each model family people fine-tune now: the folder's logits are
those of the base + adapter unmerged (peft), and it chats and stops as the run trained.

Tiny random models built from transformers' own configs with each family's quirks switched on, and an
adapter made with peft directly (random B, no training) on every linear layer, the output head and the
embedding, with per-module alpha and rank: what a run started from any adapter (`model.init_adapter`)
may carry. A run folder around it is all `merge` reads (config.yaml + adapters/policy)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.schema import to_yaml
from sapo_lite.config.sources import load_config
from sapo_lite.data.examples import BUILTIN_TEMPLATES, stop_token_ids
from sapo_lite.models.tiny import build_tokenizer

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
FAMILIES = {  # model_type, quirks
    "llama3.2": ("llama", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "qwen2.5": ("qwen2", {"tie_word_embeddings": True}),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 32}),  # q/k norms, head_dim != hidden / heads
    "gemma3": ("gemma3_text", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                               "layer_types": ["sliding_attention", "full_attention"]}),  # tied, scaled embedding
    "phi3": ("phi3", {}),  # fused qkv_proj and gate_up_proj
    "mistral-nemo": ("mistral", {"head_dim": 24, "sliding_window": None}),
}
IDS = torch.tensor([[1, 7, 9, 12, 3, 20, 31, 5, 8, 40, 4, 22, 17]])


def make_base(folder: Path, model_type: str, quirks: dict) -> Path:
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.08,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.bos_token_id,  # not the run's stop token: the merge must write that
        **quirks)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    with torch.no_grad():  # norms start at one (or zero): perturb them so a norm convention shows
        for name, param in model.named_parameters():
            if "norm" in name or "bias" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_adapter(base_dir: Path, out_dir: Path, with_base_copies: bool) -> None:
    """LoRA on every linear layer, the head and the embedding; down_proj at another alpha, o_proj another rank.
    `with_base_copies`: peft's default save, which puts copies of the embedding and head weights beside their
    LoRA (an adapter made outside sapo-lite); else LoRA tensors only, as a run saves them."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    linear = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=sorted(linear | {"embed_tokens"}),
                        alpha_pattern={"down_proj": 3}, rank_pattern={"o_proj": 2})
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_A" in name:  # peft starts B (embedding: A) at zero
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(out_dir, save_embedding_layers=with_base_copies)


def make_run(run: Path, base_dir: Path, with_base_copies: bool) -> Path:
    """A run folder as `merge` reads it, trained with another template than the base's own (zephyr, not chatml)."""
    cfg = load_config("tiny", None, [f"model.name={base_dir}", "data.chat_template=zephyr", "data.eval_path=null"])
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(cfg))
    make_adapter(base_dir, run / "adapters" / "policy", with_base_copies)
    return run


@torch.no_grad()
def logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_folder_equals_base_plus_adapter_and_chats_as_the_run(tmp_path, family):
    from peft import PeftModel

    base = make_base(tmp_path / "base", *FAMILIES[family])
    run = make_run(tmp_path / "run", base, with_base_copies=family == "qwen2.5")
    result = CliRunner().invoke(app, ["merge", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"])
    assert result.exit_code == 0, result.output
    assert ("written as its own lm_head" in result.output) == (family in ("llama3.2", "qwen2.5", "gemma3"))

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    unmerged = logits(PeftModel.from_pretrained(base_model, run / "adapters" / "policy"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert (logits(merged) - unmerged).abs().max() < 1e-4
    assert (logits(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)) - unmerged).abs().max() > 0.5
    assert json.loads((tmp_path / "merged" / "config.json").read_text()).get("tie_word_embeddings") is not True

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.chat_template == BUILTIN_TEMPLATES["zephyr"]
    eos = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert sorted(eos if isinstance(eos, list) else [eos]) == stop_token_ids(tokenizer)


def test_per_module_alpha_and_rank_merge_at_peft_scale(tmp_path, tiny_base_dir):
    """alpha_pattern gives down_proj alpha 32 where the rest has 8 (rank_pattern o_proj rank 2): each module
    is scaled by its own alpha / rank, as peft scales it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from sapo_lite.tools.merge import merge_adapter

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                           alpha_pattern={"down_proj": 32}, rank_pattern={"o_proj": 2}))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    merge_adapter(tiny_base_dir, tmp_path / "adapter", tmp_path / "merged", dtype="fp32")
    unmerged = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base_dir),
                                                tmp_path / "adapter"))
    assert (logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged")) - unmerged).abs().max() < 1e-4
