"""One full SAPO step, phase by phase, against TRL's Online DPO step on the same model.

    python bench/sapo_step.py [--rounds 3] [--threads 1] [--gen-per-step 2] [--pairs 2]

The CPU model of bench/train_step.py (Llama hidden 512 x 8 layers, vocab 32000, LoRA r=16 on
every linear layer, fp32), sampling at T 0.7 / top-k 50 / top-p 0.95. sapo-lite: `--gen-per-step`
new examples a step (128-token prompt, 256-token response, a 64-token rewritten segment),
`--pairs` pairs per policy update. TRL Online DPO (bench/online_dpo.py): `--pairs` prompts a step,
two completions each, one pair per prompt, both generated and trained in the step:

- equal sequence lengths: 256-token completions, so its sequences are as long as sapo-lite's;
- equal generated tokens: 32-token completions, 64 generated tokens a pair as in sapo-lite.

The three contenders run interleaved, one step each per round in rotated order, after a warm-up
round; the table gives median [min-max] over rounds and the ratio of pairs/s within a round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sapo_lite.data.examples import Example  # noqa: E402
from sapo_lite.models.roles import EMA, acting_as, attach_adapters, ema_update, policy_parameters, reference  # noqa: E402
from sapo_lite.sapo.augment import self_augment  # noqa: E402
from sapo_lite.sapo.buffer import ReplayBuffer  # noqa: E402
from sapo_lite.sapo.losses import dpo_loss  # noqa: E402
from sapo_lite.sapo.pair_logps import pair_logps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_dpo import OnlineDpoStep  # noqa: E402
from timing import fix_threads, interleaved, ratio_text, spread  # noqa: E402
from train_step import LORA, build_model  # noqa: E402

PHASES = ("EMA update", "generation (EMA)", "reference log-probs", "buffer add + sample", "forward+backward",
          "optimizer step")
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
PROMPT_LEN, RESPONSE_LEN = 128, 256


class SapoStep:
    def __init__(self, folder: Path, gen_per_step: int, pairs: int, segment_len: int) -> None:
        self.model = attach_adapters(build_model(), LORA, None, gradient_checkpointing=False)
        self.optimizer = torch.optim.AdamW(policy_parameters(self.model), lr=1e-5)
        self.buffer = ReplayBuffer(folder / "buffer.sqlite", capacity=2000)
        self.rng = np.random.default_rng(0)
        self.gen_per_step, self.pairs, self.segment_len = gen_per_step, pairs, segment_len
        self.phases: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.step_index = 0

    def example(self) -> Example:
        prompt = self.rng.integers(10, 32000, PROMPT_LEN).astype(np.int32)
        response = np.append(self.rng.integers(10, 32000, RESPONSE_LEN - 1), 4).astype(np.int32)
        return Example(prompt, response, "")

    def step(self) -> float:
        """One step; returns the seconds spent in generation."""
        model, device, pad_id = self.model, torch.device("cpu"), 0
        marks = [time.perf_counter()]
        ema_update(model, 0.5)
        marks.append(time.perf_counter())
        with acting_as(model, EMA):
            pairs = self_augment(model, [self.example() for _ in range(self.gen_per_step)], self.segment_len, 2048,
                                 pad_id, [4], self.rng, self.gen_per_step, SAMPLING).pairs
        marks.append(time.perf_counter())
        with reference(model):
            ref_c, ref_r, _, _ = pair_logps(model, pairs, pad_id, device)
        marks.append(time.perf_counter())
        self.step_index += 1
        self.buffer.add(pairs, self.step_index, list(zip(ref_c.tolist(), ref_r.tolist())))
        batch = self.buffer.sample(self.pairs, self.rng)
        marks.append(time.perf_counter())
        model.train()
        chosen, rejected, _, _ = pair_logps(model, batch, pad_id, device)
        ref_chosen = torch.tensor([p.ref_logp_chosen for p in batch])
        ref_rejected = torch.tensor([p.ref_logp_rejected for p in batch])
        dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.1).loss.mean().backward()
        marks.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(policy_parameters(model), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            self.phases[phase].append(end - start)
        return marks[2] - marks[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gen-per-step", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--segment-len", type=int, default=64)
    args = parser.parse_args()
    threads = fix_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        sapo = SapoStep(Path(tmp), args.gen_per_step, args.pairs, args.segment_len)
        trl_equal_len = OnlineDpoStep(Path(tmp), args.pairs, PROMPT_LEN, RESPONSE_LEN, SAMPLING, args.rounds)
        trl_equal_gen = OnlineDpoStep(Path(tmp), args.pairs, PROMPT_LEN, args.segment_len // 2, SAMPLING, args.rounds)
        contenders = {"sapo-lite": sapo, "TRL Online DPO, equal sequence lengths": trl_equal_len,
                      "TRL Online DPO, equal generated tokens": trl_equal_gen}
        gen_s: dict[str, list[float]] = {name: [] for name in contenders}

        def timed(name: str):
            return lambda: gen_s[name].append(contenders[name].step())

        times = interleaved({name: timed(name) for name in contenders}, args.rounds)
    gen_s = {name: values[1:] for name, values in gen_s.items()}  # drop the warm-up round

    print(f"whole step on CPU ({threads} threads): Llama hidden 512 x 8 layers, vocab 32000, LoRA r={LORA.r}; "
          f"sapo-lite {args.gen_per_step} new pairs a step ({PROMPT_LEN}-token prompt, {RESPONSE_LEN}-token response, "
          f"{args.segment_len}-token segment); {args.pairs} pairs trained a step by each; "
          f"median [min-max] of {args.rounds} interleaved rounds")
    print("| trainer | step (s) | pairs trained/s | generation share | sapo-lite pairs/s over this |")
    print("|---|---|---|---|---|")
    ours = times["sapo-lite"]
    for name, values in times.items():
        shares = [g / s for g, s in zip(gen_s[name], values)]
        versus = "-" if name == "sapo-lite" else f"{ratio_text(values, ours)}x"
        print(f"| {name} | {spread(values)} | {args.pairs / statistics.median(values):.3f} "
              f"| {statistics.median(shares):.0%} [{min(shares):.0%}-{max(shares):.0%}] | {versus} |")

    phases = {phase: values[1:] for phase, values in sapo.phases.items()}
    total = sum(statistics.median(v) for v in phases.values())
    print("\nsapo-lite step by phase (median seconds, share of the sum of medians)")
    print("| phase | seconds | share |")
    print("|---|---|---|")
    for phase, values in phases.items():
        print(f"| {phase} | {statistics.median(values):.3f} | {statistics.median(values) / total:.1%} |")


if __name__ == "__main__":
    main()
