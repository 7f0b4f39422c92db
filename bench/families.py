"""One row a model family: does it train, decode lean (and how much faster), merge exactly, export to GGUF,
and how does the memory estimate compare with what a run measures.

    python bench/families.py [--families qwen3,gemma3] [--decode-tokens 32]   # ~5 minutes on 2 CPU cores

Each family's tiny model (sapo_lite/models/tiny_families.py, every quirk on; Gemma 3 with its real 262k
vocabulary so that the log-prob logits dominate) is trained for 2 SAPO-DPO steps in fp32 in a fresh
process, then:

- trains: the run finished (yes / no and the error's first line);
- lean decoder: whether the EMA's rewrites go through the lean loop (`why_not_lean`), and its decode
  speed against `generate` on a tiny-but-not-trivial model of the family (hidden 512, 4 layers, vocab
  32,000, random LoRA adapters unmerged, batch 4, greedy, best of 3): tokens/s ratio;
- merge parity: `sapo-lite merge RUN --out folder --dtype fp32`, max |logit difference| of the merged folder against
  base + policy adapter unmerged (peft), or the refusal;
- GGUF: `sapo-lite merge RUN --out x.gguf --quant f32` (the tiny tokenizer's pre-tokenizer registered as
  the one it is, as the GGUF tests do); the refusal's message, or "llama.cpp not installed", or (with
  `import llama_cpp`) the same token ids as transformers, the share of positions with the same top-1
  token and the smallest per-position correlation of the teacher-forced logits;
- estimate vs measured: `sapo-lite estimate`'s total less its CUDA terms, against the training process's
  peak RSS growth over its imports (VmHWM after the run minus VmRSS before it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

TRAIN = ["--preset", "tiny", "loss.name=dpo", "loss.beta=0.1", "data.eval_path=null", "train.max_steps=2",
         "train.save_every=0", "train.warmup_steps=1", "train.num_threads=1", "data.max_examples=64",
         "data.max_len=80", "data.max_prompt_len=64", "sapo.gen_per_step=8", "sapo.gen_batch_size=8",
         "train.micro_batch=4", "sapo.segment_len=4"]
CHILD = r"""
import json, sys
from pathlib import Path
from rich.console import Console
from sapo_lite.config.sources import load_config
from sapo_lite.train.loop import train

def status_gb(field):
    line = next(l for l in open('/proc/self/status') if l.startswith(field + ':'))
    return int(line.split()[1]) / 1e6  # kB

out, args = Path(sys.argv[1]), sys.argv[2:]
cfg = load_config('tiny', overrides=[a for a in args if '=' in a and not a.startswith('--')])
open('/proc/self/clear_refs', 'w').write('5')
before = status_gb('VmRSS')
out.mkdir(parents=True)
try:
    train(cfg, out, Console(quiet=True))
    print(json.dumps({'ok': True, 'growth_gb': status_gb('VmHWM') - before}))
except Exception as exc:
    print(json.dumps({'ok': False, 'error': f'{type(exc).__name__}: {str(exc).splitlines()[0]}'}))
"""
# `sapo-lite merge RUN --out x.gguf`, with the tiny tokenizer's pre-tokenizer registered first as the one it
# really is (its trained vocabulary is in no llama.cpp table, as tests/tools/gguf_export does): Qwen2's where
# transformers loads a Qwen2 folder's tokenizer as Qwen2Tokenizer, else GPT-2's.
MERGE_TO_GGUF = r"""
import sys
from transformers import AutoTokenizer
try:
    from sapo_lite.tools.gguf_export.tokenizer_kv import pre_tokenizer_hash, register_pre_tokenizer
    register_pre_tokenizer(pre_tokenizer_hash(AutoTokenizer.from_pretrained(sys.argv[1])), sys.argv[2])
except ImportError:
    pass
from sapo_lite.cli import app
app(sys.argv[3:], prog_name='sapo-lite')
"""
DECODE_SHAPE = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
                "num_key_value_heads": 4, "head_dim": 64}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sapo_lite.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "300"})


def first_error(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    return (lines[0].removeprefix("error: ") if lines else proc.stderr.strip().splitlines()[-1])[:200]


def train_row(family: str, work: Path) -> dict:
    from sapo_lite.config.sources import load_config
    from sapo_lite.models.memory_estimate import estimate
    from sapo_lite.models.tiny_families import build_family_base

    # Gemma: its real 262k vocabulary (the estimate's largest term), and query_pre_attn_scalar = head_dim as in
    # the published Gemma 3 1B, 4B and 12B (the tiny family's own differs, to test the decoder; llama.cpp reads no
    # key for it, so the GGUF export refuses a model where it differs from head_dim).
    quirks = {"vocab_size": 262_144, "query_pre_attn_scalar": 32} if family == "gemma3" else {}
    base = build_family_base(family, work / "base", **quirks)
    args = [*TRAIN, f"model.name={base}"]
    proc = subprocess.run([sys.executable, "-c", CHILD, str(work / "run"), *args], capture_output=True, text=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {
        "ok": False, "error": proc.stderr.strip().splitlines()[-1]}
    est = estimate(load_config("tiny", overrides=args[2:]))
    result["estimate_gb"] = est.total - est.cuda_overhead
    return {**result, "base": base, "run": work / "run", "family": family}


def decode_speedup(family: str, new_tokens: int) -> tuple[str, str]:
    """(lean or the reason it is not, generate's time / the lean loop's time for the same greedy tokens)."""
    import torch

    from sapo_lite.config.schema import LoraSettings
    from sapo_lite.models.decode_plan import build_plan, why_not_lean
    from sapo_lite.models.decoding import lean_generate
    from sapo_lite.models.generation import left_pad
    from sapo_lite.models.roles import EMA, attach_adapters
    from sapo_lite.models.sampling import greedy
    from sapo_lite.models.tiny_families import build_family_model

    base, _ = build_family_model(family, vocab_size=32_000, **DECODE_SHAPE)
    model = attach_adapters(base, LoraSettings(r=16, alpha=32), None, gradient_checkpointing=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.eval()
    model.set_adapter(EMA, inference_mode=True)
    why = why_not_lean(model)
    if why is not None:
        return f"no: {why}", "-"
    contexts = torch.randint(5, 32_000, (4, 32), generator=torch.Generator().manual_seed(0)).tolist()
    ids, mask = left_pad(contexts, 0)
    never = [31_999]

    def hf() -> list[list[int]]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=never, pad_token_id=0, min_new_tokens=0)
        return out[:, ids.shape[1]:].tolist()

    def lean() -> list[list[int]]:
        return lean_generate(build_plan(model), contexts, new_tokens, 0, never, greedy)

    times = {}
    for name, fn in (("hf", hf), ("lean", lean)):
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            tokens = fn()
            best = min(best, time.perf_counter() - start)
        times[name] = (best, tokens)
    same = "same tokens" if times["hf"][1] == times["lean"][1] else "OTHER TOKENS"
    return "yes", f"{times['hf'][0] / times['lean'][0]:.2f}x ({same})"


def merge_parity(row: dict, work: Path) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = cli("merge", str(row["run"]), "--out", str(work / "merged"), "--dtype", "fp32")
    if proc.returncode != 0:
        return f"refused: {first_error(proc)}"
    ids = torch.randint(5, 300, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(row["base"], dtype=torch.float32)
        unmerged = PeftModel.from_pretrained(base, row["run"] / "adapters" / "policy").eval()(ids).logits
    return f"{(merged - unmerged).abs().max().item():.1e}"


def gguf_agreement(row: dict, work: Path) -> str:
    pre_tokenizer = "qwen2" if row["family"] == "qwen2.5" else "gpt-2"
    proc = subprocess.run([sys.executable, "-c", MERGE_TO_GGUF, str(row["base"]), pre_tokenizer, "merge",
                           str(row["run"]), "--out", str(work / "x.gguf"), "--quant", "f32"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"})
    if proc.returncode != 0:
        return f"refused: {first_error(proc)}"
    try:
        import llama_cpp
    except ImportError:
        return "llama.cpp not installed"
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = work / "merged"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = "reverse : 3 1 4 1 5 9 2 6"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    llm = llama_cpp.Llama(model_path=str(work / "x.gguf"), n_ctx=256, verbose=False, logits_all=True, n_threads=1)
    try:
        same_ids = llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([ids])).logits[0].numpy()
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    corr = min(float(np.corrcoef(g, w)[0, 1]) for g, w in zip(got, want))
    return f"ids {'same' if same_ids else 'DIFFER'}, top-1 {top1:.2f}, min corr {corr:.5f}"


def main() -> None:
    from sapo_lite.models.families import FAMILIES

    parser = argparse.ArgumentParser()
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--decode-tokens", type=int, default=32)
    args = parser.parse_args()
    rows = []
    for family in args.families.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            trained = train_row(family, work)
            lean, speedup = decode_speedup(family, args.decode_tokens)
            if trained["ok"]:
                merge, gguf = merge_parity(trained, work), gguf_agreement(trained, work)
                memory = f"{trained['estimate_gb']:.2f} / {trained['growth_gb']:.2f} GB"
            else:
                merge = gguf = memory = "-"
            rows.append([FAMILIES[family].label, "yes" if trained["ok"] else f"no: {trained['error']}", lean,
                         speedup, merge, gguf, memory])
            print(" | ".join(rows[-1]), flush=True)
    header = ["family", "trains", "lean decoder", "decode vs generate", "merge max |dlogit|", "GGUF in llama.cpp",
              "estimate / measured"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nload average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; torch threads 1")


if __name__ == "__main__":
    main()
