"""One full SAPO step, phase by phase: where the time goes.

    python bench/sapo_step.py [--steps 4]

The CPU model of bench/train_step.py (Llama hidden 512 x 8 layers, vocab 32000, LoRA r=16 on
every linear layer, fp32), SAPO settings scaled to it: 4 new examples a step with 128-token
prompts and 256-token responses, a 64-token rewritten segment, 2 pairs per policy update.
Each phase is timed around the library call that does it; the table gives the median of
`--steps` steps after a warm-up step, and each phase's share of the whole.
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

from sapo_lite.augment import make_pairs  # noqa: E402
from sapo_lite.batching import pair_logps  # noqa: E402
from sapo_lite.buffer import ReplayBuffer  # noqa: E402
from sapo_lite.data import Example  # noqa: E402
from sapo_lite.losses import dpo_loss  # noqa: E402
from sapo_lite.model import EMA, acting_as, attach_adapters, ema_update, policy_parameters, reference  # noqa: E402

sys_path_bench = Path(__file__).resolve().parent
import sys  # noqa: E402

sys.path.insert(0, str(sys_path_bench))
from train_step import LORA, build_model  # noqa: E402

PHASES = ("EMA update", "generation (EMA)", "reference log-probs", "buffer add + sample", "forward+backward",
          "optimizer step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--gen-per-step", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--segment-len", type=int, default=64)
    args = parser.parse_args()

    device = torch.device("cpu")
    model = attach_adapters(build_model(), LORA, None, gradient_checkpointing=False)
    optimizer = torch.optim.AdamW(policy_parameters(model), lr=1e-5)
    rng = np.random.default_rng(0)
    stop_ids, pad_id = [4], 0

    def example() -> Example:
        prompt = rng.integers(10, 32000, 128).astype(np.int32)
        response = np.append(rng.integers(10, 32000, 255), 4).astype(np.int32)
        return Example(prompt, response, "")

    sampling = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
    timings: dict[str, list[float]] = {phase: [] for phase in PHASES}
    with tempfile.TemporaryDirectory() as tmp:
        buffer = ReplayBuffer(Path(tmp) / "buffer.sqlite", capacity=2000)
        for step in range(args.steps + 1):
            marks = [time.perf_counter()]
            ema_update(model, 0.5)
            marks.append(time.perf_counter())
            with acting_as(model, EMA):
                pairs = make_pairs(model, [example() for _ in range(args.gen_per_step)], args.segment_len, 2048,
                                   pad_id, stop_ids, rng, args.gen_per_step, sampling)
            marks.append(time.perf_counter())
            with reference(model):
                ref_c, ref_r, _, _ = pair_logps(model, pairs, pad_id, device)
            marks.append(time.perf_counter())
            buffer.add(pairs, step, list(zip(ref_c.tolist(), ref_r.tolist())))
            batch = buffer.sample(args.pairs, rng)
            marks.append(time.perf_counter())
            model.train()
            chosen, rejected, _, _ = pair_logps(model, batch, pad_id, device)
            ref_chosen = torch.tensor([p.ref_logp_chosen for p in batch])
            ref_rejected = torch.tensor([p.ref_logp_rejected for p in batch])
            dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1).loss.mean().backward()
            marks.append(time.perf_counter())
            torch.nn.utils.clip_grad_norm_(policy_parameters(model), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            marks.append(time.perf_counter())
            if step:  # step 0 is the warm-up
                for phase, start, end in zip(PHASES, marks, marks[1:]):
                    timings[phase].append(end - start)

    medians = {phase: statistics.median(values) for phase, values in timings.items()}
    total = sum(medians.values())
    print(f"one SAPO step on CPU ({torch.get_num_threads()} threads): Llama hidden 512 x 8 layers, vocab 32000, "
          f"{args.gen_per_step} new pairs (128-token prompt, 256-token response, {args.segment_len}-token segment), "
          f"{args.pairs} pairs per update, median of {args.steps} steps")
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for phase, seconds in medians.items():
        print(f"| {phase} | {seconds:.3f} | {seconds / total:.1%} |")
    print(f"| whole step | {total:.3f} | 100% |")


if __name__ == "__main__":
    main()
