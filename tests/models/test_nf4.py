"""The QLoRA path: NF4 base from bitsandbytes, LoRA on top, on CPU."""

import json

import pytest
import torch

from sapo_lite.config.schema import LoraSettings, ModelConfig
from sapo_lite.config.sources import load_config
from sapo_lite.models.roles import attach_adapters, load_base

bnb = pytest.importorskip("bitsandbytes")


def test_nf4_gradients_match_the_dequantised_model(tiny_base_dir):
    """Backprop through the 4-bit layers gives the LoRA gradients of the weights training sees."""
    from bitsandbytes.functional import dequantize_4bit

    quantised = load_base(ModelConfig(quant="nf4", dtype="fp32"), str(tiny_base_dir), torch.device("cpu"))
    dense = load_base(ModelConfig(quant="none", dtype="fp32"), str(tiny_base_dir), torch.device("cpu"))
    layers = {n: m for n, m in quantised.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) == 14  # 7 linear layers x 2 blocks are 4-bit; embeddings and head are not
    for name, layer in layers.items():
        dense.get_submodule(name).weight.data.copy_(dequantize_4bit(layer.weight.data, layer.weight.quant_state))

    grads = []
    ids = torch.randint(5, 40, (2, 10))
    for base in (quantised, dense):
        torch.manual_seed(1)
        model = attach_adapters(base, LoraSettings(r=4, alpha=8, dropout=0.0), None, gradient_checkpointing=True)
        for name, param in model.named_parameters():
            if "lora_B.policy" in name:  # B starts at zero, which would make A's gradient zero
                torch.nn.init.normal_(param, std=0.02)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    quantised_grads, dense_grads = grads
    assert quantised_grads.keys() == dense_grads.keys()
    for name, grad in dense_grads.items():
        assert torch.allclose(quantised_grads[name], grad, rtol=0.05, atol=1e-6), name


def test_a_few_sapo_steps_on_an_nf4_base(tmp_path):
    from rich.console import Console

    from sapo_lite.train.loop import train

    cfg = load_config("tiny", overrides=[
        "model.quant=nf4", "model.gradient_checkpointing=true", "loss.name=dpo", "loss.beta=0.1",
        "train.max_steps=3", "data.eval_path=null",
    ])
    result = train(cfg, tmp_path, Console(quiet=True))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and result.steps == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # DPO starts at log 2 and the policy moves away from it
    assert (tmp_path / "adapters" / "policy" / "adapter_model.safetensors").is_file()
