"""SAPO's self-augmentation: the EMA rewrites a segment of each good response.

For a prompt P and chosen response R of L tokens (EOS included):

    g = min(segment_len, L)
    t ~ UniformInt[0, min(L-3-g, max_len-P-g)]   if L-3-g > 0, else t = 0
    the EMA generates <= g tokens from P + R[:t]
    rejected = P + R[:t] + segment up to and incl. its first stop token   (segment ends early)
             = P + R[:t] + segment (g tokens) + R[t+g:]                  (otherwise)

Same as the official code: the bounds of t and g, splicing with and without a stop token,
sampling (temperature 0.7, top-k 50, top-p 0.95), left padding, one generate call per batch
bounded by the longest segment in it.

Departures from the official code, on purpose:
- stop tokens (EOS / end of turn) keep attention in both sequences; the official code masks
  them, which hides where an answer ends from the loss.
- a segment ends at EOS or the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`);
  the official code checks the tokenizer's EOS only, so with a ChatML template it splices
  text from after the end of the turn.
- one rewrite per example (the official `responses_per_prompt`, 1 in all its scripts).
- the truncation point is drawn with a seeded generator owned by the trainer, so a resumed
  run draws the same points.
- BOS: the generator's input P + R[:t] is a prefix of the training sequence, BOS included
  where the tokenizer adds one (the official generator's input has no BOS).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import TrainingDiverged


@dataclass
class Pair:
    """A (chosen, rejected) pair ready for the buffer; ids are full sequences incl. the prompt."""

    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    prompt_len: int
    trunc_point: int
    segment_len: int


def choose_truncation(
    response_len: int, prompt_len: int, segment_len: int, max_len: int, rng: np.random.Generator
) -> tuple[int, int]:
    """(t, g): where the rewritten segment starts in the response, and its length."""
    g = min(segment_len, response_len)
    if response_len - 3 - g > 0:
        high = min(response_len - 3 - g, max_len - prompt_len - g)
        t = int(rng.integers(0, max(high, 0) + 1))
    else:
        t = 0
    return t, g


def splice_rejected(
    prompt_ids: np.ndarray,
    response_ids: np.ndarray,
    t: int,
    g: int,
    segment: Sequence[int],
    stop_ids: Sequence[int],
) -> np.ndarray:
    """The rejected sequence: the chosen one with R[t:t+g] replaced by the EMA's segment."""
    segment = list(segment)[:g]
    stop_at = next((i for i, tok in enumerate(segment) if tok in set(stop_ids)), None)
    if stop_at is not None:
        tail: list[int] = []
        segment = segment[: stop_at + 1]
    else:
        tail = list(response_ids[t + g :])
    rejected = [*prompt_ids.tolist(), *response_ids[:t].tolist(), *segment, *tail]
    return np.asarray(rejected, dtype=np.int32)


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded so that every sequence ends at the last column."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def generate_segments(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    stop_ids: Sequence[int],
    temperature: float,
    top_k: int,
    top_p: float,
    static_cache: bool = False,
) -> list[list[int]]:
    """Sample up to `max_new_tokens` tokens after each context in one batched call (KV cache on).

    `static_cache` preallocates the KV cache; on CUDA transformers then compiles the decoding
    step with torch.compile (slow first steps, faster after).
    """
    input_ids, attention_mask = left_pad(contexts, pad_id)
    device = next(model.parameters()).device
    try:
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_token_id=list(stop_ids),
            pad_token_id=pad_id,
            use_cache=True,
            cache_implementation="static" if static_cache else None,
        )
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        raise TrainingDiverged(
            "the EMA adapter's next-token probabilities are not finite: training has diverged",
            "lower `train.lr` and resume from the last good checkpoint with `sapo-lite train --resume RUN`",
        ) from exc
    return output[:, input_ids.shape[1] :].tolist()


def make_pairs(
    model: torch.nn.Module,
    examples: Sequence,
    segment_len: int,
    max_len: int,
    pad_id: int,
    stop_ids: Sequence[int],
    rng: np.random.Generator,
    gen_batch_size: int,
    sampling: dict,
    static_cache: bool = False,
) -> list[Pair]:
    """Turn examples into (chosen, rejected) pairs; `model` must already be the EMA generator.

    Every truncation point is drawn first, in the order of `examples` (so a seed or a resumed
    run gives each example the same point whatever the batching); the generation batches then
    take the contexts sorted by length, so a batch left-pads little and stops together.
    """
    cuts = [
        choose_truncation(len(ex.response_ids), len(ex.prompt_ids), segment_len, max_len, rng) for ex in examples
    ]
    contexts = [[*ex.prompt_ids.tolist(), *ex.response_ids[:t].tolist()] for ex, (t, _) in zip(examples, cuts)]
    order = sorted(range(len(examples)), key=lambda i: len(contexts[i]))
    segments: list[list[int]] = [[] for _ in examples]
    for start in range(0, len(order), gen_batch_size):
        batch = order[start : start + gen_batch_size]
        generated = generate_segments(
            model, [contexts[i] for i in batch], max(cuts[i][1] for i in batch), pad_id, stop_ids, **sampling,
            static_cache=static_cache,
        )
        for i, segment in zip(batch, generated):
            segments[i] = segment
    pairs: list[Pair] = []
    for ex, (t, g), segment in zip(examples, cuts, segments):
        chosen = np.concatenate([ex.prompt_ids, ex.response_ids]).astype(np.int32)
        rejected = splice_rejected(ex.prompt_ids, ex.response_ids, t, g, segment, stop_ids)
        pairs.append(Pair(chosen, rejected, len(ex.prompt_ids), t, g))
    return pairs


def chosen_only_pairs(examples: Sequence) -> list[Pair]:
    """Pairs with an empty rejected response, for a loss that trains on the chosen one alone (SFT):
    they go through the same buffer, so SFT sees the same examples in the same order as SAPO."""
    return [
        Pair(np.concatenate([ex.prompt_ids, ex.response_ids]).astype(np.int32), np.empty(0, np.int32),
             len(ex.prompt_ids), 0, 0)
        for ex in examples
    ]
