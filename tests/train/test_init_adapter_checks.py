"""`model.init_adapter` read by the same adapter reader as `merge` and the GGUF export: what a run from it
could not record, merge or export is refused in one line before training, not after it."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sapo_lite.config.sources import load_config
from sapo_lite.errors import SapoError
from sapo_lite.train.preflight import check_init_adapter

TINY_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


@pytest.fixture(scope="module")
def tiny_base(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_base_dir)


def refusal(adapter, base) -> str:
    """What `sapo-lite train --preset tiny model.init_adapter=ADAPTER` says before training (the CLI prints it)."""
    cfg = load_config("tiny", None, [f"model.init_adapter={adapter}"])
    with pytest.raises(SapoError) as info:
        check_init_adapter(cfg, base, "tiny")
    assert "\n" not in info.value.message
    return info.value.message


def test_an_init_adapter_with_its_own_alpha_for_some_modules_is_refused(tmp_path, tiny_base_dir, tiny_base):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    config = LoraConfig(r=16, lora_alpha=32, target_modules=TINY_LINEAR, alpha_pattern={"down_proj": 64})
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_base_dir), config).save_pretrained(adapter)
    assert "gives modules their own rank or alpha (down_proj alpha 64 (alpha_pattern)), which lora.r=16 and " \
           "lora.alpha=32 cannot record" in refusal(adapter, tiny_base)


def test_an_init_adapter_of_another_size_is_one_line_not_a_traceback(tmp_path, tiny_base):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": TINY_LINEAR}))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{key}.lora_A.weight": torch.zeros(16, 96), f"{key}.lora_B.weight": torch.zeros(128, 16)},
              adapter / "adapter_model.safetensors")  # the tiny model's q_proj is [128, 128]
    assert "does not match the base model: model.layers.0.self_attn.q_proj.weight is [128, 128] but LoRA " \
           "A[16, 96]" in refusal(adapter, tiny_base)
