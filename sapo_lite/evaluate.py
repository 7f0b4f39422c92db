"""Held-out exact match: does greedy decoding reproduce the reference answer?

Used for the before/after figure of a run: the base (adapters off) against the trained policy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from .augment import left_pad
from .data import Example
from .model import POLICY


@torch.no_grad()
def greedy_answers(
    model: Any, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int, stop_ids: Sequence[int],
    batch_size: int = 32,
) -> list[str]:
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        ids, mask = left_pad([ex.prompt_ids.tolist() for ex in batch], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(stop_ids),
            pad_token_id=tokenizer.pad_token_id,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def exact_match(
    model: Any, tokenizer: Any, examples: Sequence[Example], role: str, max_new_tokens: int,
    stop_ids: Sequence[int],
) -> float:
    """Share of examples whose greedy answer equals the reference, for role `base` or an adapter name."""
    was_training = model.training
    model.eval()
    context = model.disable_adapter() if role == "base" else contextlib.nullcontext()
    try:
        if role != "base":
            model.set_adapter(role, inference_mode=True)
        with context:
            answers = greedy_answers(model, tokenizer, examples, max_new_tokens, stop_ids)
    finally:
        model.set_adapter(POLICY)
        model.train(was_training)
    hits = sum(answer == ex.response_text for answer, ex in zip(answers, examples))
    return hits / len(examples)
