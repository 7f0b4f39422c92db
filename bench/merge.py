"""Merge: peak RAM of the shard-by-shard merge against the model's size, and NF4 parity figures.

    python bench/merge.py            # ~2 minutes on 2 CPU cores

Part 1 builds a random Llama of ~0.7 GB (fp32) saved in ~100 MB shards plus a LoRA adapter,
then merges it in a fresh process twice: sapo-lite's shard-by-shard merge and the usual
in-memory `merge_and_unload()` + `save_pretrained`. Peak RSS growth is measured in the child
(VmHWM after the merge minus VmRSS before it, the peak reset after a warm-up merge of a small
model so that lazy imports do not count).

Part 2 trains the tiny preset on an NF4 base for 60 steps and reports the mean absolute
per-token log-prob difference between the NF4 base + adapter (what training saw) and each
merge mode.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CHILD = r"""
import json, sys, torch
from pathlib import Path

def status_mb(field):
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) / 1e3  # kB

mode, base, adapter, out, warm_base, warm_adapter = sys.argv[1:7]
from peft import PeftModel
from transformers import AutoModelForCausalLM
from sapo_lite.tools.merge import merge_adapter

def merge(base, adapter, out):
    if mode == 'sharded':
        merge_adapter(Path(base), Path(adapter), Path(out), dtype='fp32')
    else:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
        model.save_pretrained(out, max_shard_size='100MB')

merge(warm_base, warm_adapter, out + '-warmup')  # every lazy import done before the baseline
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM); ru_maxrss would include the parent's
before = status_mb('VmRSS')
merge(base, adapter, out)
print(json.dumps({'growth_mb': status_mb('VmHWM') - before}))
"""


def build_model(folder: Path, name: str, **shape) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **shape))
    model.save_pretrained(folder / name / "base", max_shard_size="100MB")
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                  init_lora_weights=False))
    peft_model.save_pretrained(folder / name / "adapter")


def build_models(folder: Path) -> tuple[float, float]:
    build_model(folder, "small", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    build_model(folder, "large", vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=8)
    shards = list((folder / "large" / "base").glob("*.safetensors"))
    return sum(s.stat().st_size for s in shards) / 1e6, max(s.stat().st_size for s in shards) / 1e6


def child_growth(mode: str, folder: Path) -> float:
    out = folder / f"merged-{mode}"
    large, small = folder / "large", folder / "small"
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(large / "base"), str(large / "adapter"), str(out),
                           str(small / "base"), str(small / "adapter")], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_mb"]


def nf4_parity(folder: Path) -> dict[str, float]:
    import torch
    from peft import PeftModel
    from rich.console import Console
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from sapo_lite.config.sources import load_config
    from sapo_lite.data.examples import load_examples
    from sapo_lite.models.roles import load_tokenizer
    from sapo_lite.tools.merge import merge_adapter
    from sapo_lite.train.loop import train

    run = folder / "nf4-run"
    cfg = load_config("tiny", overrides=["model.quant=nf4", "train.max_steps=60", "data.eval_path=null"])
    train(cfg, run, Console(quiet=True))
    tokenizer = load_tokenizer(str(run / "base_model"))
    examples = load_examples("bundled:tiny-reverse-eval", "test", tokenizer, cfg.data).examples[:64]
    sequences = [torch.tensor([*e.prompt_ids, *e.response_ids]) for e in examples]

    def per_token_logps(model):
        values = []
        with torch.no_grad():
            for seq in sequences:
                logits = model(input_ids=seq[None]).logits[0, :-1].float()
                values.append(logits.log_softmax(-1).gather(-1, seq[1:, None])[:, 0])
        return torch.cat(values)

    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    trained = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(run / "base_model", quantization_config=bnb), run / "adapters" / "policy"
    ).eval()
    reference = per_token_logps(trained)
    gaps = {}
    for mode, roundtrip in (("merge (original weights)", False), ("merge --nf4-roundtrip", True)):
        out = folder / mode.replace(" ", "_")
        merge_adapter(run / "base_model", run / "adapters" / "policy", out, dtype="fp32", roundtrip=roundtrip)
        merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        gaps[mode] = (per_token_logps(merged) - reference).abs().mean().item()
    return gaps


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        total_mb, shard_mb = build_models(folder)
        adapter_mb = (folder / "large" / "adapter" / "adapter_model.safetensors").stat().st_size / 1e6
        sharded = child_growth("sharded", folder)
        in_memory = child_growth("in-memory", folder)
        print(f"model (fp32 safetensors): {total_mb:.0f} MB in shards of at most {shard_mb:.0f} MB; "
              f"adapter {adapter_mb:.1f} MB")
        print("| merge | peak RSS growth (MB) | as share of model size |")
        print("|---|---|---|")
        for name, growth in (("sapo-lite, shard by shard", sharded), ("in-memory merge_and_unload", in_memory)):
            print(f"| {name} | {growth:.0f} | {growth / total_mb:.0%} |")
        gaps = nf4_parity(folder)
        print("\nmean |per-token log-prob difference| against NF4 base + adapter (tiny, 60 NF4 steps, 64 prompts)")
        print("| merge mode | mean abs diff (nats) |")
        print("|---|---|")
        for mode, gap in gaps.items():
            print(f"| {mode} | {gap:.2e} |")
    print(f"\nbench peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
