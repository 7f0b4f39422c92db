"""The real thing on a CUDA GPU: Llama-3-8B architecture (random weights) in NF4 with a preset's settings.

    python bench/gpu.py                      # CUDA: llama3-8b-qlora at 2048 tokens, capped at 24 GB
    python bench/gpu.py --cap-gb 0           # no cap
    python bench/gpu.py --arch tiny          # the same path with a tiny model (what runs on a CPU)

No download: the model is built from the architecture with random weights (exact memory and
speed), saved as bf16 safetensors shards, and loaded through sapo-lite's own `load_base` in NF4,
exactly as `sapo-lite train` loads a hub model. `--cap-gb` caps this process's CUDA memory with
`torch.cuda.set_per_process_memory_fraction`, so a run that completes proves the preset fits a
card of that size. Reported: peak VRAM (allocated and reserved) against `sapo-lite estimate`,
training tokens/s, generation tokens/s, and the step split by phase; then the generation phase alone
with each decoder, interleaved: `lean` (the default, adapter unmerged on NF4), `hf` (`generate`) and
`hf` with the static cache (which transformers compiles with torch.compile on CUDA; its first calls,
the compilation, are left out as warm-up).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sapo_lite.config.sources import load_config  # noqa: E402
from sapo_lite.data.examples import Example  # noqa: E402
from sapo_lite.models.memory_estimate import architecture_from_config, estimate  # noqa: E402
from sapo_lite.models.roles import EMA, acting_as, attach_adapters, ema_update, load_base, reference  # noqa: E402
from sapo_lite.sapo.augment import self_augment  # noqa: E402
from sapo_lite.sapo.buffer import ReplayBuffer  # noqa: E402
from sapo_lite.sapo.losses import LOSSES, PairLogps  # noqa: E402
from sapo_lite.sapo.pair_logps import pair_logps  # noqa: E402
from sapo_lite.train.session import build_optimizer  # noqa: E402

ARCHS = {
    "llama3-8b": {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0},
    "tiny": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2},
}


def build_random_model(arch: str, folder: Path) -> None:
    """Random bf16 weights of the architecture, built on the meta device and filled in place (fast)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**ARCHS[arch], max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # bf16 before memory exists: 16 GB, not 32, for 8B
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.save_pretrained(folder, max_shard_size="5GB")
    del model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama3-8b-qlora")
    parser.add_argument("--arch", choices=list(ARCHS), default=None, help="default: llama3-8b on CUDA, tiny on CPU")
    parser.add_argument("--cap-gb", type=float, default=24.0, help="cap CUDA memory to this (0: no cap)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=None, help="default: the preset's (2048); 256 on CPU")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    arch = args.arch or ("llama3-8b" if cuda else "tiny")
    max_len = args.max_len or (None if cuda else 256)
    if cuda and args.cap_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * 1e9 / total))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / arch
        started = time.perf_counter()
        build_random_model(arch, folder)
        overrides = [f"model.name={folder}"]
        if not cuda:
            overrides += ["model.dtype=fp32"]
        if max_len:
            overrides += [f"data.max_len={max_len}", f"data.max_prompt_len={max_len // 2}",
                          f"sapo.segment_len={max_len // 8}"]
        cfg = load_config(args.preset, overrides=overrides)
        base = load_base(cfg.model, str(folder), device)
        model = attach_adapters(base, cfg.lora, None, cfg.model.gradient_checkpointing)
        load_s = time.perf_counter() - started
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg, trainable, device)
        loss_spec = LOSSES[cfg.loss.name]
        rng = np.random.default_rng(0)
        half = cfg.data.max_len // 2
        vocab = ARCHS[arch]["vocab_size"]

        def example() -> Example:
            return Example(rng.integers(3, vocab, half).astype(np.int32),
                           np.append(rng.integers(3, vocab, half - 1), 2).astype(np.int32), "")

        sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
        phases = ("EMA update", "generation", "reference log-probs", "buffer", "forward+backward", "optimizer")
        timings: dict[str, list[float]] = {p: [] for p in phases}
        generated_tokens, trained_tokens = [], []
        buffer = ReplayBuffer(Path(tmp) / "buffer.sqlite", cfg.sapo.buffer_size)

        def sync() -> float:
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter()

        for step in range(args.steps + 1):
            marks = [sync()]
            ema_update(model, cfg.sapo.ema_decay)
            marks.append(sync())
            with acting_as(model, EMA):
                pairs = self_augment(model, [example() for _ in range(cfg.sapo.gen_per_step)], cfg.sapo.segment_len,
                                     cfg.data.max_len, 0, [2], rng, cfg.sapo.gen_batch_size, sampling,
                                     decoder=cfg.sapo.decoder).pairs
            marks.append(sync())
            ref = None
            if loss_spec.needs_reference:
                with reference(model):
                    ref_c, ref_r, _, _ = pair_logps(model, pairs, 0, device, cfg.train.logps_chunk_tokens)
                ref = list(zip(ref_c.tolist(), ref_r.tolist()))
            marks.append(sync())
            buffer.add(pairs, step, ref)
            batches = [buffer.sample(cfg.train.micro_batch, rng) for _ in range(cfg.train.grad_accum)]
            marks.append(sync())
            model.train()
            for batch in batches:
                chosen, rejected, n_c, n_r = pair_logps(model, batch, 0, device, cfg.train.logps_chunk_tokens)
                logps = PairLogps(chosen, rejected, n_c, n_r)
                if loss_spec.needs_reference:
                    logps.ref_chosen = torch.tensor([p.ref_logp_chosen for p in batch], device=device)
                    logps.ref_rejected = torch.tensor([p.ref_logp_rejected for p in batch], device=device)
                (loss_spec.fn(logps, cfg.loss.beta).loss.mean() / cfg.train.grad_accum).backward()
            marks.append(sync())
            torch.nn.utils.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(sync())
            if step:  # step 0 warms up kernels and the allocator
                for phase, start, end in zip(phases, marks, marks[1:]):
                    timings[phase].append(end - start)
                generated_tokens.append(sum(len(p.rejected_ids) - p.prompt_len - p.trunc_point for p in pairs))
                trained_tokens.append(sum(len(p.chosen_ids) + len(p.rejected_ids) for b in batches for p in b))
        decoders = compare_decoders(model, cfg, [example() for _ in range(cfg.sapo.gen_per_step)], sync, args.steps)

    medians = {p: statistics.median(v) for p, v in timings.items()}
    total = sum(medians.values())
    predicted = estimate(cfg, architecture_from_config(ARCHS[arch] | {"tie_word_embeddings": False})).total
    name = torch.cuda.get_device_name(0) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{name}: {arch} (random weights) in {cfg.model.quant}, preset {args.preset}, max_len {cfg.data.max_len}, "
          f"micro_batch {cfg.train.micro_batch} x grad_accum {cfg.train.grad_accum}, gen {cfg.sapo.gen_per_step} "
          f"x <= {cfg.sapo.segment_len} tokens; load {load_s:.0f} s; median of {args.steps} steps")
    if cuda:
        peak_alloc = torch.cuda.max_memory_allocated() / 1e9
        peak_reserved = torch.cuda.max_memory_reserved() / 1e9
        cap = f" (capped at {args.cap_gb:g} GB)" if args.cap_gb else ""
        print(f"peak VRAM: {peak_alloc:.2f} GB allocated, {peak_reserved:.2f} GB reserved{cap}; "
              f"sapo-lite estimate: {predicted:.2f} GB")
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for phase, seconds in medians.items():
        print(f"| {phase} | {seconds:.2f} | {seconds / total:.1%} |")
    print(f"| whole step | {total:.2f} | 100% |")
    print(f"training tokens/s: {statistics.median(trained_tokens) / medians['forward+backward']:.0f}; "
          f"generation tokens/s: {statistics.median(generated_tokens) / medians['generation']:.1f}")
    print(f"generation of {cfg.sapo.gen_per_step} rewrites alone, by decoder "
          f"(median of {args.steps} interleaved rounds):")
    print("| decoder | seconds | tokens/s |")
    print("|---|---|---|")
    for decoder, (seconds, tokens) in decoders.items():
        print(f"| {decoder} | {seconds:.2f} | {tokens / seconds:.1f} |")


def compare_decoders(model, cfg, examples, sync, rounds: int) -> dict[str, tuple[float, float]]:
    """decoder -> (median seconds, median tokens generated) of one generation phase on `examples`."""
    sampling = {"temperature": cfg.sapo.temperature, "top_k": cfg.sapo.top_k, "top_p": cfg.sapo.top_p}
    choices = {"lean": ("lean", False), "hf": ("hf", False), "hf + static cache": ("hf", True)}
    seconds: dict[str, list[float]] = {name: [] for name in choices}
    tokens: dict[str, list[int]] = {name: [] for name in choices}
    with acting_as(model, EMA):
        for round_index in range(rounds + 2):  # two warm-up rounds: torch.compile of the static cache's step
            for name, (decoder, static) in choices.items():
                rng = np.random.default_rng(round_index)  # the same cut points for every decoder in a round
                start = sync()
                pairs = self_augment(model, examples, cfg.sapo.segment_len, cfg.data.max_len, 0, [2], rng,
                                     cfg.sapo.gen_batch_size, sampling, static, decoder).pairs
                if round_index >= 2:
                    seconds[name].append(sync() - start)
                    tokens[name].append(sum(len(p.rejected_ids) - p.prompt_len - p.trunc_point for p in pairs))
    return {name: (statistics.median(seconds[name]), statistics.median(tokens[name])) for name in choices}


if __name__ == "__main__":
    main()
