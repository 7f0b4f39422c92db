"""Every GPU preset's own settings, run on the CPU: what a GPU user runs, minus the 8B model and the GPU.

For each preset in presets/ that trains an 8B model: exactly its settings (NF4 with double quantisation,
bf16 compute, gradient checkpointing, its optimizer choice, loss and beta, buffer, EMA, micro-batch and
gradient accumulation, chat template) except the model, replaced by a small model of the same family built
here (Llama-3 or Mistral geometry shrunk), the paper's data (a hub dataset), replaced by a local file in the
same `chosen` message-list shape, and lengths shrunk to fit. Each runs a few steps, is killed with SIGKILL
in its last policy update and resumed to the same losses as an uninterrupted run, then merged and loaded
by plain transformers, and answers through `generate`. What the CPU cannot do (the paged 8-bit optimizer,
flash-attn) falls back the way it says.
"""

import json
import signal

import pytest
from helpers import run, start_paused

from sapo_lite.config.sources import load_config, preset_names
from sapo_lite.models.families import FAMILIES

pytestmark = pytest.mark.slow  # NF4 in bf16 on the CPU, three runs a preset

# The model families' presets (models/families/) run their settings on their own tiny models, one short run
# each, in tests/train/test_family_training.py; here the paper's models, with kill, resume and merge.
# The pairs preset (`sapo.pairs=data`) shares its model settings with llama3-8b-qlora; its pair source is run by
# tests/train/test_pair_sources_resume.py on the tiny model.
FAMILY_PRESETS = {family.preset for family in FAMILIES.values()}
GPU_PRESETS = [name for name in preset_names()
               if load_config(name).model.quant == "nf4" and name not in FAMILY_PRESETS
               and load_config(name).sapo.pairs == "self"]
SHRUNK = ["data.max_len=64", "data.max_prompt_len=40", "sapo.segment_len=8", "data.eval_path=null",
          "train.max_steps=4", "train.save_every=2", "train.warmup_steps=1", "train.num_threads=1"]
FAMILY = {"meta-llama": "llama", "mistralai": "mistral", "wandb": "mistral"}


def small_model(folder, family: str):
    """A 2-layer model of the preset's family (GQA, its rope base), with the tiny demo's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from sapo_lite.models.tiny import build_tokenizer

    if (folder / "config.json").is_file():
        return folder
    tokenizer = build_tokenizer()
    shape = {"vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
             "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
             "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False}
    import torch

    torch.manual_seed(0)
    if family == "llama":  # Llama-3: rope base 500,000, 4 query heads per KV head
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_theta=500000.0))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, rope_theta=10000.0, sliding_window=4096))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chosen_rows(path, count: int = 48):
    """The paper's data shape: a `chosen` message list whose last assistant turn is the response."""
    import random

    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(count):
            digits = [str(rng.randint(0, 9)) for _ in range(5)]
            chosen = [{"role": "user", "content": "reverse : " + " ".join(digits)},
                      {"role": "assistant", "content": " ".join(reversed(digits))}]
            handle.write(json.dumps({"chosen": chosen}) + "\n")
    return path


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_the_presets_settings_train_resume_merge_and_generate(tmp_path, preset):
    cfg = load_config(preset)
    family = FAMILY[cfg.model.name.split("/")[0]]
    model = small_model(tmp_path / f"small-{family}", family)
    data = chosen_rows(tmp_path / "chosen.jsonl")
    args = ["--preset", preset, f"model.name={model}", f"data.path={data}", *SHRUNK]

    straight = run(tmp_path, "train", *args, "--out", "straight")
    written = load_config(None, tmp_path / "straight" / "config.yaml")
    assert (written.model.quant, written.model.double_quant, written.model.dtype) == ("nf4", True, "bf16")
    assert written.model.gradient_checkpointing and written.loss.name == cfg.loss.name
    assert (written.train.micro_batch, written.train.grad_accum) == (cfg.train.micro_batch, cfg.train.grad_accum)
    assert "error" not in straight.stderr.lower()

    proc, _ = start_paused(tmp_path, "training:4", "train", *args, "--out", "killed")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    resumed = run(tmp_path, "train", "--resume", "killed")
    assert "resuming from step-2" in resumed.stdout
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")

    run(tmp_path, "merge", "killed", "--out", "merged")
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert type(merged).__name__.lower().startswith(family)
    answered = run(tmp_path, "generate", "killed", "--prompt", "reverse : 1 2 3", "--max-new-tokens", "4")
    assert "reverse : 1 2 3" in answered.stdout
