"""One DPO training step: sapo-lite against TRL's DPOTrainer (PEFT), same model, LoRA, batch, lengths.

    pip install trl      # the only extra this benchmark needs
    python bench/train_step.py [--steps 3] [--pairs 2] [--seq-len 512] [--threads 1] [--rewrite 64]

A Llama built locally (hidden 512, 8 layers, vocab 32000; random weights) with LoRA r=16 on
every linear layer, fp32 on the CPU, no gradient checkpointing, 2 pairs a step, 512 tokens a
sequence (half prompt, half response). By default chosen and rejected share only the prompt,
the least a SAPO pair shares; `--rewrite 64` makes pairs as SAPO does (the rejected response is
the chosen one with 64 tokens rewritten from a random point), which only sapo-lite exploits. The contenders are
measured in one run, one step each per round in rotated order, with a fixed thread count; the
figures are median [min-max] over `--steps` rounds after a warm-up round, ratios taken within a round.

- sapo-lite: pairs drawn from the SQLite buffer with their cached reference log-probs, one
  policy forward+backward over chosen and rejected, DPO loss, optimizer step.
- TRL DPOTrainer: the same step through `trainer.training_step` + optimizer step; by default it
  runs a reference forward (adapters disabled) every step.
- TRL with `precompute_ref_log_probs=True`: reference log-probs computed before training.
- TRL with precomputed reference and its fused head scoring completion positions only: what
  TRL does on CUDA/XPU with Triton; on CPU its head scores every position (prompt and padding)
  and no DPOConfig option changes that (`padding_free` is disabled in TRL 1.16), so this
  configuration is forced by patching `trl.trainer.utils._use_triton` during its steps. It is
  the best TRL configuration for this case; `speedup_vs_trl` is against it.

The step time excludes SAPO's generation (TRL's DPO has none); bench/sapo_step.py breaks a full
SAPO step down.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
warnings.filterwarnings("ignore")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sapo_lite.config.schema import LoraSettings  # noqa: E402
from sapo_lite.models.roles import attach_adapters, policy_parameters, reference  # noqa: E402
from sapo_lite.models.tiny import build_tokenizer  # noqa: E402
from sapo_lite.sapo.augment import Pair  # noqa: E402
from sapo_lite.sapo.buffer import ReplayBuffer  # noqa: E402
from sapo_lite.sapo.losses import dpo_loss  # noqa: E402
from sapo_lite.sapo.pair_logps import pair_logps  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import fix_threads, interleaved, ratio_text, spread  # noqa: E402

LORA = LoraSettings(r=16, alpha=32, dropout=0.0, target_modules="all-linear")


def build_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         tie_word_embeddings=False, pad_token_id=0, eos_token_id=4, bos_token_id=1)
    return LlamaForCausalLM(config)


def make_rows(count: int, half_len: int, rng: np.random.Generator, rewrite: int = 0) -> list[dict[str, str]]:
    """Prompt and two responses of `half_len` - 1 digit tokens each; with `rewrite`, the rejected
    response is the chosen one with `rewrite` tokens from a random point replaced, as SAPO makes them."""
    def words(n):
        return [str(d) for d in rng.integers(0, 10, n)]

    rows = []
    for _ in range(count):
        chosen = words(half_len - 1)
        rejected = words(half_len - 1)
        if rewrite:
            t = int(rng.integers(0, half_len - 1 - rewrite + 1))
            rejected = chosen[:t] + [str((int(chosen[t]) + 1) % 10)] + words(rewrite - 1) + chosen[t + rewrite :]
        rows.append({"prompt": " ".join(words(half_len)), "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    return rows


class SapoLiteStep:
    def __init__(self, rows, tokenizer, pairs_per_step: int, folder: Path):
        self.model = attach_adapters(build_model(), LORA, None, gradient_checkpointing=False)
        self.optimizer = torch.optim.AdamW(policy_parameters(self.model), lr=1e-5)
        self.pairs_per_step = pairs_per_step
        self.rng = np.random.default_rng(0)
        self.buffer = ReplayBuffer(folder / "buffer.sqlite", capacity=2000)
        eos = tokenizer.eos_token_id
        pairs = []
        for row in rows:
            prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
            chosen = tokenizer(row["chosen"], add_special_tokens=False)["input_ids"] + [eos]
            rejected = tokenizer(row["rejected"], add_special_tokens=False)["input_ids"] + [eos]
            pairs.append(Pair(np.array(prompt + chosen, np.int32), np.array(prompt + rejected, np.int32),
                              len(prompt), 0, len(chosen)))
        with reference(self.model):  # reference log-probs once, when pairs enter the buffer (as in training)
            refs = []
            for start in range(0, len(pairs), pairs_per_step):
                chunk = pairs[start : start + pairs_per_step]
                ref_c, ref_r, _, _ = pair_logps(self.model, chunk, 0, torch.device("cpu"))
                refs += list(zip(ref_c.tolist(), ref_r.tolist()))
        self.buffer.add(pairs, step=0, ref_logps=refs)
        self.tokens = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs[:pairs_per_step])

    def step(self) -> float:
        self.model.train()
        batch = self.buffer.sample(self.pairs_per_step, self.rng)
        chosen, rejected, _, _ = pair_logps(self.model, batch, 0, torch.device("cpu"))
        ref_c = torch.tensor([p.ref_logp_chosen for p in batch])
        ref_r = torch.tensor([p.ref_logp_rejected for p in batch])
        loss = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.1).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy_parameters(self.model), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


class TrlStep:
    def __init__(self, rows, tokenizer, pairs_per_step: int, folder: Path, precompute: bool,
                 completion_only_head: bool = False):
        from datasets import Dataset
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(
            output_dir=str(folder / f"trl-{precompute}-{completion_only_head}"),
            per_device_train_batch_size=pairs_per_step,
            max_length=2048, bf16=False, use_cpu=True, gradient_checkpointing=False, report_to=[],
            learning_rate=1e-5, precompute_ref_log_probs=precompute, logging_steps=10_000, save_strategy="no",
            max_grad_norm=1.0, dataloader_num_workers=0,
        )
        self.trainer = DPOTrainer(
            model=build_model(), args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
            peft_config=LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        self.batches = iter(self.trainer.get_train_dataloader())
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we step around
        self.model = self.trainer.model
        self.completion_only_head = completion_only_head

    def head_mode(self):
        if not self.completion_only_head:
            return contextlib.nullcontext()
        import trl.trainer.utils as trl_utils

        @contextlib.contextmanager
        def compact():
            original = trl_utils._use_triton
            trl_utils._use_triton = lambda device: True  # TRL's completion-only path, taken on CUDA with Triton
            try:
                yield
            finally:
                trl_utils._use_triton = original

        return compact()

    def step(self) -> float:
        with self.head_mode():
            return self._step()

    def _step(self) -> float:
        self.model.train()
        try:
            inputs = next(self.batches)
        except StopIteration:
            self.batches = iter(self.trainer.get_train_dataloader())
            inputs = next(self.batches)
        loss = self.trainer.training_step(self.model, inputs)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--rewrite", type=int, default=0,
                        help="SAPO-shaped pairs: rejected = chosen with this many tokens rewritten (0: independent)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:
        import trl
    except ImportError:
        sys.exit("bench/train_step.py compares against TRL: pip install trl")
    threads = fix_threads(args.threads)

    tokenizer = build_tokenizer()
    rows = make_rows(args.pairs * (args.steps + 2), args.seq_len // 2, np.random.default_rng(0), args.rewrite)
    ours = "sapo-lite (cached reference, shared prefix)"
    trl_names = ("TRL DPOTrainer + PEFT, defaults", "TRL, precompute_ref_log_probs=True",
                 "TRL, precomputed reference + completion-only head")
    with tempfile.TemporaryDirectory() as tmp:
        contenders = {
            ours: SapoLiteStep(rows, tokenizer, args.pairs, Path(tmp)),
            trl_names[0]: TrlStep(rows, tokenizer, args.pairs, Path(tmp), precompute=False),
            trl_names[1]: TrlStep(rows, tokenizer, args.pairs, Path(tmp), precompute=True),
            trl_names[2]: TrlStep(rows, tokenizer, args.pairs, Path(tmp), precompute=True, completion_only_head=True),
        }
        times = interleaved({name: contender.step for name, contender in contenders.items()}, args.steps)

    print(f"DPO step on CPU ({threads} threads), torch {torch.__version__}, trl {trl.__version__}: "
          f"Llama hidden 512 x 8 layers, vocab 32000, LoRA r={LORA.r} all-linear, {args.pairs} pairs/step, "
          f"{args.seq_len} tokens/sequence, "
          f"{f'rejected = chosen with {args.rewrite} tokens rewritten' if args.rewrite else 'independent responses'}"
          f", median [min-max] of {args.steps} interleaved rounds")
    print("| trainer | step (s) | pairs/s | this / sapo-lite |")
    print("|---|---|---|---|")
    for name, values in times.items():
        versus = "-" if name == ours else f"{ratio_text(values, times[ours])}x"
        print(f"| {name} | {spread(values)} | {args.pairs / statistics.median(values):.2f} | {versus} |")
    best = min(trl_names, key=lambda name: statistics.median(times[name]))
    print(f"speedup_vs_trl_defaults: {ratio_text(times[trl_names[0]], times[ours])}")
    print(f"speedup_vs_trl_precomputed_ref: {ratio_text(times[trl_names[1]], times[ours])}")
    print(f"speedup_vs_trl: {ratio_text(times[best], times[ours])} (against the best TRL configuration: {best})")


if __name__ == "__main__":
    main()
