"""Answers to prompts from any role (base, policy, ema), and the held-out exact-match score.

The score is the before/after figure of a run: the base (adapters off) against the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .augment import left_pad
from .data import Example
from .model import acting_as


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, stop_ids: Sequence[int],
    temperature: float = 0.0, batch_size: int = 32,
) -> list[str]:
    """Decoded answers (special tokens dropped, stripped); greedy unless `temperature` > 0."""
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start : start + batch_size], tokenizer.pad_token_id)
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            eos_token_id=list(stop_ids), pad_token_id=tokenizer.pad_token_id, **sampling,
        )
        answers += tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return [a.strip() for a in answers]


def exact_match(
    model: Any, tokenizer: Any, examples: Sequence[Example], role: str, max_new_tokens: int,
    stop_ids: Sequence[int],
) -> float:
    """Share of examples whose greedy answer equals the reference, for `base` or an adapter name."""
    with acting_as(model, role):
        answers = generate_answers(
            model, tokenizer, [ex.prompt_ids.tolist() for ex in examples], max_new_tokens, stop_ids
        )
    hits = sum(answer == ex.response_text for answer, ex in zip(answers, examples))
    return hits / len(examples)
