"""EMA generation against TRL Online DPO's generation on the same model: prefill and decode tokens/s.

    python bench/generation.py [--rounds 2] [--threads 1] [--new-tokens 64]

The CPU model of bench/train_step.py (Llama hidden 512 x 8 layers, vocab 32000, LoRA r=16 on
every linear layer, fp32), T 0.7 / top-k 50 / top-p 0.95, 4 sequences a generation batch.

- sapo-lite: the contexts P + R[:t] of 8 examples (128-token prompt, 256-token response, t
  drawn as in training) through `generate_segments` with the EMA adapter active (policy and EMA
  loaded), in batches of 4 sorted by context length as `self_augment` does; "unsorted" takes the
  same contexts in example order, as before sorting.
- TRL: `OnlineDPOTrainer._generate` (2 prompts of 128 tokens, two completions each).

Prefill is timed as the same call with one new token; decode tokens/s = (sequences x (n - 1))
/ (full call - prefill call). Prefill tokens/s counts real context tokens (padding excluded,
so padding shows as a lower rate). Interleaved rounds, median [min-max].
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402

from sapo_lite.data.examples import Example  # noqa: E402
from sapo_lite.models.roles import EMA, acting_as, attach_adapters  # noqa: E402
from sapo_lite.sapo.augment import choose_truncation, generate_segments  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_dpo import OnlineDpoStep  # noqa: E402
from timing import fix_threads, interleaved  # noqa: E402
from train_step import LORA, build_model  # noqa: E402

SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
BATCH, EXAMPLES, PROMPT_LEN, RESPONSE_LEN = 4, 8, 128, 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    threads = fix_threads(args.threads)
    rng = np.random.default_rng(0)
    examples = [Example(rng.integers(10, 32000, PROMPT_LEN).astype(np.int32),
                        np.append(rng.integers(10, 32000, RESPONSE_LEN - 1), 4).astype(np.int32), "")
                for _ in range(EXAMPLES)]
    model = attach_adapters(build_model(), LORA, None, gradient_checkpointing=False)
    cut_rng = np.random.default_rng(7)
    cuts = [choose_truncation(RESPONSE_LEN, PROMPT_LEN, args.new_tokens, 2048, cut_rng) for _ in examples]
    contexts = [[*ex.prompt_ids.tolist(), *ex.response_ids[:t].tolist()] for ex, (t, _) in zip(examples, cuts)]
    sapo_context_tokens = sum(len(c) for c in contexts)

    by_length = sorted(contexts, key=len)

    def generate(ordered: list[list[int]], new_tokens: int) -> None:
        with acting_as(model, EMA):
            for start in range(0, len(ordered), BATCH):
                generate_segments(model, ordered[start : start + BATCH], new_tokens, 0, [4], **SAMPLING)

    with tempfile.TemporaryDirectory() as tmp:
        trl = OnlineDpoStep(Path(tmp), 2, PROMPT_LEN, args.new_tokens, SAMPLING, args.rounds)
        trainer = trl.trainer
        inputs = next(iter(trl.loader))
        prompts = [x["prompt"] for x in inputs] if isinstance(inputs, list) else inputs["prompt"]

        def trl_generate(new_tokens: int) -> None:
            trainer.generation_config.max_new_tokens = new_tokens
            trainer._generate(trl.model, prompts)

        trl_prompt_tokens = 2 * sum(len(trainer.processing_class(p)["input_ids"]) for p in prompts)
        times = interleaved({
            "sapo-lite full": lambda: generate(by_length, args.new_tokens),
            "sapo-lite prefill": lambda: generate(by_length, 1),
            "unsorted full": lambda: generate(contexts, args.new_tokens),
            "unsorted prefill": lambda: generate(contexts, 1),
            "TRL full": lambda: trl_generate(args.new_tokens), "TRL prefill": lambda: trl_generate(1),
        }, args.rounds)

    sequences = {"sapo-lite": EXAMPLES, "unsorted": EXAMPLES, "TRL": 4}
    context_tokens = {"sapo-lite": sapo_context_tokens, "unsorted": sapo_context_tokens, "TRL": trl_prompt_tokens}
    print(f"generation on CPU ({threads} threads): Llama hidden 512 x 8 layers, vocab 32000, LoRA r={LORA.r}, "
          f"batches of {BATCH} sequences, {args.new_tokens} new tokens (no early stop: random weights), "
          f"median [min-max] of {args.rounds} interleaved rounds")
    print("| generator | sequences | context tokens | prefill tokens/s | decode tokens/s | whole call (s) |")
    print("|---|---|---|---|---|---|")
    for name, label in (("sapo-lite", "sapo-lite EMA, sorted batches"), ("unsorted", "sapo-lite EMA, unsorted"),
                        ("TRL", "TRL Online DPO _generate")):
        full, prefill = times[f"{name} full"], times[f"{name} prefill"]
        prefill_rate = [context_tokens[name] / p for p in prefill]
        decode_rate = [sequences[name] * (args.new_tokens - 1) / max(f - p, 1e-9) for f, p in zip(full, prefill)]

        def fmt(values: list[float]) -> str:
            return f"{statistics.median(values):.0f} [{min(values):.0f}-{max(values):.0f}]"

        print(f"| {label} | {sequences[name]} | {context_tokens[name]} | {fmt(prefill_rate)} | {fmt(decode_rate)} "
              f"| {statistics.median(full):.2f} |")


if __name__ == "__main__":
    main()
