"""TRL's Online DPO (trl.experimental.online_dpo, PEFT) on the benchmark model, for the whole-loop
and generation benchmarks; `trainer._generate` is timed to give its generation share.

The reward is a plain function (completion length), so no reward model runs: what is timed is
TRL's generation (two completions per prompt), its policy and reference forwards, loss and backward.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from train_step import LORA, build_model

VOCAB = 32000


def wide_tokenizer():
    """A word-level tokenizer covering the benchmark model's 32000 ids (`w5` ... `w31999`), so any
    sampled id decodes; ids 0-4 are pad, BOS, unk, im_start, EOS as in the model config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + [f"w{i}" for i in range(len(specials), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<unk>")


def prompt_texts(count: int, prompt_len: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(f"w{i}" for i in rng.integers(10, VOCAB, prompt_len)) for _ in range(count)]


def length_reward(prompts, completions, **_) -> list[float]:
    return [float(len(c)) for c in completions]


class OnlineDpoStep:
    """One TRL Online DPO optimizer step on `pairs` prompts (two completions each = one pair)."""

    def __init__(self, folder: Path, pairs: int, prompt_len: int, max_new_tokens: int, sampling: dict,
                 rounds: int) -> None:
        from datasets import Dataset
        from peft import LoraConfig
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        rows = [{"prompt": p} for p in prompt_texts(pairs * (rounds + 2), prompt_len, np.random.default_rng(1))]
        args = OnlineDPOConfig(
            output_dir=str(folder / f"online-dpo-{max_new_tokens}"), per_device_train_batch_size=pairs,
            max_new_tokens=max_new_tokens, max_length=prompt_len + max_new_tokens, use_cpu=True, bf16=False,
            report_to=[], learning_rate=1e-5, logging_steps=10_000, save_strategy="no", max_grad_norm=1.0,
            dataloader_num_workers=0, gradient_checkpointing=False, **sampling,
        )
        self.trainer = OnlineDPOTrainer(
            model=build_model(), reward_funcs=length_reward, args=args, train_dataset=Dataset.from_list(rows),
            processing_class=wide_tokenizer(),
            peft_config=LoraConfig(r=LORA.r, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules="all-linear",
                                   task_type="CAUSAL_LM"),
        )
        self.trainer.create_optimizer()
        self.trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), which we step around
        self.model = self.trainer.model
        self.loader = self.trainer.get_train_dataloader()
        self.batches = iter(self.loader)
        self.pairs = pairs
        self.gen_s = 0.0
        generate = self.trainer._generate

        def timed_generate(*args, **kwargs):
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.gen_s += time.perf_counter() - start

        self.trainer._generate = timed_generate

    def step(self) -> float:
        """Runs one step; returns the seconds spent in generation."""
        self.gen_s = 0.0
        self.model.train()
        try:
            inputs = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            inputs = next(self.batches)
        self.trainer.training_step(self.model, inputs)
        torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], 1.0)
        self.trainer.optimizer.step()
        self.trainer.optimizer.zero_grad(set_to_none=True)
        return self.gen_s
