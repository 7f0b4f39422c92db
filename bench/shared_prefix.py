"""Shared-prefix pairs against chosen and rejected as separate sequences, by shared fraction.

    python bench/shared_prefix.py [--rounds 2] [--threads 1] [--seq-len 384] [--pairs 2]

The CPU model of bench/train_step.py (Llama hidden 512 x 8 layers, vocab 32000, LoRA r=16 on
every linear layer, fp32, sdpa). Each pair: a 128-token prompt and a response; chosen and
rejected are `--seq-len` tokens long and identical over the first `fraction` of the sequence
(prompt + R[:t]), as after a SAPO rewrite at t. Timed per layout: the policy forward+backward
(what a training step runs) and the reference forward without gradients (what a new pair
costs). Layouts alternate round by round; the speed-up is separate / shared within a round.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sapo_lite.models.roles import attach_adapters, reference  # noqa: E402
from sapo_lite.sapo.augment import Pair  # noqa: E402
from sapo_lite.sapo.pair_logps import pair_logps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fix_threads, interleaved, ratio_text, spread  # noqa: E402
from train_step import LORA, build_model  # noqa: E402

PROMPT_LEN = 128


def make_pairs(count: int, seq_len: int, fraction: float, rng: np.random.Generator) -> list[Pair]:
    shared = max(PROMPT_LEN, int(round(fraction * seq_len)))
    pairs = []
    for _ in range(count):
        chosen = rng.integers(10, 32000, seq_len).astype(np.int32)
        rejected = chosen.copy()
        rejected[shared:] = rng.integers(10, 32000, seq_len - shared)
        rejected[shared] = chosen[shared] + 1  # they part exactly at the rewrite point
        pairs.append(Pair(chosen, rejected, PROMPT_LEN, shared - PROMPT_LEN, seq_len - shared))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=384)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--fractions", default="0.33,0.5,0.75,0.9")
    args = parser.parse_args()
    threads = fix_threads(args.threads)
    device = torch.device("cpu")
    model = attach_adapters(build_model(), LORA, None, gradient_checkpointing=False)
    rng = np.random.default_rng(0)

    print(f"shared-prefix vs separate layout on CPU ({threads} threads): Llama hidden 512 x 8 layers, vocab 32000, "
          f"LoRA r={LORA.r}, {args.pairs} pairs x {args.seq_len} tokens (prompt {PROMPT_LEN}), "
          f"median [min-max] of {args.rounds} interleaved rounds")
    print("| shared fraction | fwd+bwd separate (s) | fwd+bwd shared (s) | speed-up | reference separate (s) "
          "| reference shared (s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for fraction in (float(f) for f in args.fractions.split(",")):
        pairs = make_pairs(args.pairs, args.seq_len, fraction, rng)

        def train(shared_prefix: bool, pairs: list[Pair] = pairs) -> None:
            model.train()
            chosen, rejected, _, _ = pair_logps(model, pairs, 0, device, shared_prefix=shared_prefix)
            (chosen - rejected).sum().backward()
            model.zero_grad(set_to_none=True)

        def ref(shared_prefix: bool, pairs: list[Pair] = pairs) -> None:
            with reference(model):
                pair_logps(model, pairs, 0, device, shared_prefix=shared_prefix)

        times = interleaved({
            "train separate": lambda: train(False), "train shared": lambda: train(True),
            "ref separate": lambda: ref(False), "ref shared": lambda: ref(True),
        }, args.rounds)
        print(f"| {fraction:.2f} | {spread(times['train separate'])} | {spread(times['train shared'])} "
              f"| {ratio_text(times['train separate'], times['train shared'])}x | {spread(times['ref separate'])} "
              f"| {spread(times['ref shared'])} | {ratio_text(times['ref separate'], times['ref shared'])}x |",
              flush=True)


if __name__ == "__main__":
    main()
