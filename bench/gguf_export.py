"""GGUF export of a SmolLM2 run, per quant type: file size, time, peak memory, and how faithful each file is.

    python bench/gguf_export.py [--run RUN] [--workdir DIR] [--scaling]   # ~15 minutes on 2 CPU cores

Without --run it first trains the smollm2-135m preset for 4 steps (1 thread). Each quant type is
exported by the real command, `sapo-lite merge RUN --out DIR/smol.QUANT.gguf --quant QUANT`, in a
fresh process, under `/usr/bin/time` for its peak RSS. The reference everywhere is transformers on
the base with the run's policy merged by peft in fp32: max |logit difference| on 3 chat prompts, and
how many leading tokens of the greedy answers to 5 prompts agree, for transformers reading the GGUF
(32 tokens) and for llama.cpp (48 tokens, when llama-cpp-python is installed). --scaling also
exports a random ~0.6B bf16 Llama in shards, to show that peak memory does not grow with the model.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "tools" / "gguf_export"))  # the comparison helpers the tests use
os.environ.setdefault("HF_HUB_OFFLINE", "1")
QUANTS = ["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"]
PROMPTS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
           "How many legs does a spider have?", "Explain in one sentence what a CPU does."]
PARAMS_8B = 8.03e9


def measured(command: list[str]) -> tuple[str, float, float, float]:
    """Run `command`; its output, wall seconds, CPU seconds (a steadier figure on a shared machine) and peak
    RSS in MB.

    Through `/usr/bin/time`: a child's ru_maxrss starts at its parent's RSS at the fork (Linux folds the
    forked copy's high-water mark in at exec), so this process, holding models, cannot measure its children.
    """
    with tempfile.NamedTemporaryFile("r") as peak:
        started = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", peak.name, *command], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-3000:]}")
        user_s, system_s, peak_kb = peak.read().split()[-3:]
        return proc.stdout, seconds, float(user_s) + float(system_s), int(peak_kb) / 1024


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sapo_lite.cli", *args]


def train_run(run: Path) -> None:
    if not (run / "adapters" / "policy" / "adapter_model.safetensors").is_file():
        measured(cli("train", "--preset", "smollm2-135m", "--out", str(run), "train.max_steps=4",
                     "data.eval_path=null", "--overwrite"))


def llamacpp_agreement(llama_cpp, path: Path, prompts: dict, reference: dict) -> tuple[int, int, int]:
    from gguf_models import agreement, greedy_llamacpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, n_threads=1)
    agreed = stopped = 0
    for prompt, ids in prompts.items():
        got, stop = greedy_llamacpp(llm, ids, 48)
        agreed, stopped = agreed + agreement(reference[prompt], got), stopped + stop
    llm.close()
    return agreed, sum(len(r) for r in reference.values()), stopped


def scaling(workdir: Path, smol_base: Path) -> None:
    """Peak RSS of the export alone (library, fresh process) for SmolLM2 and for a ~4x larger bf16 model."""
    import shutil

    import torch
    from gguf_models import make_random_lora
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = workdir / "random-llama-0.6b"
    if not (base / "model.safetensors.index.json").is_file():
        base.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "GGUF_SOURCE"):
            shutil.copy(smol_base / name, base / name)  # SmolLM2's tokenizer, copied from its GGUF
        config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                             num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=False,
                             bos_token_id=1, eos_token_id=2)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base, max_shard_size="500MB")
        make_random_lora(base, workdir / "random-adapter", r=16, std=0.02)
    code = ("import sys, torch; torch.set_num_threads(1); from sapo_lite.tools.gguf_export import export_gguf; "
            "export_gguf(sys.argv[1], sys.argv[2], sys.argv[3], adapter_dir=sys.argv[4], overwrite=True)")
    print("\n| model (checkpoint) | quant | file MB | wall s | CPU s | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    cases = [("SmolLM2-135M (fp32, 1 file)", smol_base, workdir / "smol-adapter"),
             ("random Llama 0.6B (bf16, 3 shards)", base, workdir / "random-adapter")]
    if not (workdir / "smol-adapter" / "adapter_model.safetensors").is_file():
        make_random_lora(smol_base, workdir / "smol-adapter", r=16, std=0.02)
    for label, folder, adapter in cases:
        for quant in ("q8_0", "f16"):
            out = workdir / f"scaling.{quant}.gguf"
            _, seconds, cpu_s, rss = measured([sys.executable, "-c", code, str(folder), str(out), quant, str(adapter)])
            print(f"| {label} | {quant} | {out.stat().st_size / 2**20:.0f} | {seconds:.1f} | {cpu_s:.1f} | {rss:.0f} |",
                  flush=True)
            out.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run of the smollm2-135m preset (default: train one, 4 steps)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/sapo-gguf-bench"))
    parser.add_argument("--scaling", action="store_true", help="also export a random ~0.6B model")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    run = args.run or args.workdir / "run"
    train_run(run)

    import torch
    from gguf_models import agreement, gguf_model, greedy_hf, max_logit_diff, merged_model

    from sapo_lite.data.examples import install_chat_template, render_prompt_ids, stop_token_ids
    from sapo_lite.models.roles import load_tokenizer
    from sapo_lite.run.layout import RunDir

    files, exports = {}, {}
    for quant in QUANTS:  # before this process loads any model (see measured())
        files[quant] = args.workdir / f"smol.{quant}.gguf"
        output, wall_s, cpu_s, rss_mb = measured(cli("merge", str(run), "--out", str(files[quant]), "--quant", quant,
                                                     "--overwrite"))
        exports[quant] = (float(re.search(r" in ([\d.]+)s", output)[1]), wall_s, cpu_s, rss_mb)
        print(f"exported {quant}", flush=True)
    torch.set_num_threads(1)
    cfg = RunDir(run).read_config()
    base = Path(RunDir(run).base_model_name(cfg))
    tokenizer = load_tokenizer(str(base))
    install_chat_template(tokenizer, cfg.data.chat_template)
    stops = stop_token_ids(tokenizer)
    prompts = {p: render_prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS}
    reference = merged_model(base, run / "adapters" / "policy")
    greedy32 = {p: greedy_hf(reference, ids, 32, stops) for p, ids in prompts.items()}
    greedy48 = {p: greedy_hf(reference, ids, 48, stops) for p, ids in prompts.items()}
    try:
        import llama_cpp
    except ImportError as exc:
        llama_cpp = None
        print(f"llama.cpp columns skipped: {exc}")

    rows = []
    for quant in QUANTS:
        model = gguf_model(files[quant])
        diff = max_logit_diff(model, reference, list(prompts.values())[:3])
        hf = sum(agreement(greedy32[p], greedy_hf(model, ids, 32, stops)) for p, ids in prompts.items())
        del model
        cpp = llamacpp_agreement(llama_cpp, files[quant], prompts, greedy48) if llama_cpp else None
        rows.append((quant, files[quant].stat().st_size / 2**20, *exports[quant], diff, hf, cpp))

    total32 = sum(len(g) for g in greedy32.values())
    print(f"\nrun {run}: {sum(p.numel() for p in reference.parameters()) / 1e6:.0f}M parameters")
    print("| quant | file MB | write s | command s (CPU s) | peak RSS MB | max logit diff | transformers agree | "
          "llama.cpp agree | llama.cpp stopped |")
    print("|---|---|---|---|---|---|---|---|---|")
    for quant, mb, write_s, wall_s, cpu_s, rss_mb, diff, hf, cpp in rows:
        cpp_cells = f"{cpp[0]}/{cpp[1]} | {cpp[2]}/5" if cpp else "- | -"
        print(f"| {quant} | {mb:.1f} | {write_s:.1f} | {wall_s:.1f} ({cpu_s:.1f}) | {rss_mb:.0f} | {diff:.3g} | "
              f"{hf}/{total32} | {cpp_cells} |")
    scale = PARAMS_8B / sum(p.numel() for p in reference.parameters())
    print(f"\n8B extrapolation (x{scale:.0f} parameters): write time "
          + ", ".join(f"{q} ~{w * scale / 60:.0f} min" for q, _, w, *_ in rows if q in ("f16", "q8_0", "q4_0"))
          + "; peak RSS does not grow with the model (--scaling)")

    if llama_cpp is not None:
        llm = llama_cpp.Llama(model_path=str(files["q8_0"]), n_ctx=512, verbose=False, n_threads=1)
        answer = llm.create_chat_completion([{"role": "user", "content": PROMPTS[0]}], max_tokens=48,
                                            temperature=0.0, top_k=1, repeat_penalty=1.0)["choices"][0]
        llm.close()
        print(f"\nllama.cpp, q8_0, chat {PROMPTS[0]!r}: {answer['message']['content']!r} ({answer['finish_reason']})")
        print(f"transformers, merged: {tokenizer.decode(greedy48[PROMPTS[0]], skip_special_tokens=True)!r}")
    if args.scaling:
        scaling(args.workdir, base)


if __name__ == "__main__":
    main()
