"""A LoRA on SmolLM2's tied output head, merged to a folder and exported to GGUF: do they compute base + adapter?

The reproduction of issue 29 item 2: SmolLM2-135M-Instruct (tied embeddings) with a LoRA on q_proj, v_proj and
lm_head, lm_head's B scaled x300 so the head's delta stands above float noise. The adapter is made with peft
(seeded random B, std 0.02) in a run folder as `sapo-lite merge` reads it, in place of a trained run. Each output
is compared with the base + adapter unmerged (peft) on teacher-forced chat prompts: max |logit diff|, top-1
agreement over positions, and the mean per-position Pearson correlation of the logits. The GGUF file is read by
transformers (it dequantises it) and, where `llama_cpp` imports, by llama.cpp too.

    python bench/tied_head.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from sapo_lite.cli import app  # noqa: E402
from sapo_lite.config.schema import to_yaml  # noqa: E402
from sapo_lite.config.sources import load_config  # noqa: E402
from sapo_lite.models.gguf_base import gguf_base  # noqa: E402

MODEL = "smollm2-135m-instruct"
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea."]


def make_run(run: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = load_config("smollm2-135m", None, ["lora.target_modules=q_proj,v_proj,lm_head"])
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(cfg))
    base = gguf_base(MODEL, run / "base_model")
    torch.manual_seed(0)  # peft draws A at random
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj", "lm_head"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02 * (300 if "lm_head" in name else 1))
    model.save_pretrained(run / "adapters" / "policy", save_embedding_layers=False)  # as a run saves it
    return run


def compare(name: str, got: np.ndarray, want: np.ndarray) -> None:
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    corr = float(np.mean([np.corrcoef(g, w)[0, 1] for g, w in zip(got, want)]))
    print(f"| {name} | {np.abs(got - want).max():.3g} | {top1:.2f} | {corr:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None)
    work = parser.parse_args().work or Path(tempfile.mkdtemp(prefix="tied-head-"))
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = make_run(work / "run")
    tokenizer = AutoTokenizer.from_pretrained(run / "base_model")
    ids = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": p}],
                                         tokenize=False) for p in PROMPTS]
    ids = [tokenizer(text, add_special_tokens=False).input_ids for text in ids]
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base_model", dtype=torch.float32),
                                          run / "adapters" / "policy").eval()

    def logits(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([model(torch.tensor([x])).logits[0].numpy() for x in ids])

    want = logits(reference)
    print("| output, vs base + adapter unmerged (peft) | max abs logit diff | top-1 agreement | mean correlation |")
    print("|---|---|---|---|")
    with reference.disable_adapter():
        compare("the base alone (how much the adapter matters)", logits(reference), want)
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(run), "--out", str(work / "merged"), "--dtype", "fp32", "--overwrite"])
    if result.exit_code == 0:
        compare("`merge --out folder --dtype fp32`", logits(AutoModelForCausalLM.from_pretrained(
            work / "merged", dtype=torch.float32).eval()), want)
    else:
        error = next(line for line in result.output.splitlines() if line.startswith("error:"))
        print(f"| `merge --out folder --dtype fp32` | refused: {error.removeprefix('error: ')} | | |")
    gguf_file = work / "smol.f32.gguf"
    result = runner.invoke(app, ["merge", str(run), "--out", str(gguf_file), "--quant", "f32", "--overwrite"])
    assert result.exit_code == 0, result.output
    from_file = AutoModelForCausalLM.from_pretrained(work, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    compare("`merge --out smol.f32.gguf`, read by transformers", logits(from_file), want)
    try:
        import llama_cpp
    except ImportError:
        print("| `merge --out smol.f32.gguf`, read by llama.cpp | llama_cpp not installed | | |")
        return
    got = []
    for x in ids:  # a fresh context per prompt: after reset() a second eval() read the first prompt's cache
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=512, logits_all=True, verbose=False, n_threads=1)
        llm.eval(x)
        got.append(np.asarray(llm.scores[: len(x)]))
        llm.close()
    compare("`merge --out smol.f32.gguf`, read by llama.cpp", np.concatenate(got), want)


if __name__ == "__main__":
    main()
