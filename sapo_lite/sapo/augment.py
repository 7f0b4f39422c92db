"""SAPO's self-augmentation: the EMA rewrites a segment of each good response.

For a prompt P and chosen response R of L tokens (EOS included):

    g = min(segment_len, L)
    t ~ UniformInt[0, min(L-3-g, max_len-P-g)]   if L-3-g > 0, else t = 0
    the EMA generates <= g tokens from P + R[:t]
    rejected = P + R[:t] + segment up to and incl. its first stop token   (segment ends early)
             = P + R[:t] + segment (g tokens) + R[t+g:]                  (otherwise)

So a rejected response ends one of three ways (`pair_ending`): it keeps the chosen tail
R[t+g:], it ends with the EMA's own stop token, or, when the segment reached the end of the
response without a stop token, it is cut at the length limit, often mid-sentence.

Two options for short responses, which the official rule (written for 2048-token answers and
256-token segments) handles poorly:
- `short_rewrite="free"`: a response too short to leave a tail (L-3-g <= 0, so t = 0) is
  rewritten from its start with up to `segment_len` tokens (at most max_len-P) instead of L,
  so the EMA can end its answer itself, and may write a longer one than the chosen; the
  official rule (`"official"`) caps the rewrite at L tokens and cuts it there.
- `identical="drop"` leaves out pairs whose rejected response equals the chosen one (no
  preference signal), unless that would leave the buffer with nothing to train on;
  `"resample"` rewrites those once more from a newly drawn cut point; `"keep"` is the
  official behaviour.

Same as the official code: the bounds of t and g, splicing with and without a stop token,
sampling (temperature 0.7, top-k 50, top-p 0.95), left padding, one generation call per batch
bounded by the longest segment in it.

How the segments are decoded (`sapo.decoder`): `lean` runs sapo-lite's own decode loop
(models/decoding.py: the same tokens as `generate` when greedy, the same sampling distribution,
about 2x the tokens/s on the CPU); a model it does not support, or `hf`, runs transformers'
`generate` on the PeftModel, as TRL's online trainers do.

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
from functools import partial

import numpy as np
import torch

from ..errors import TrainingDiverged
from ..models.decode_plan import plan_for
from ..models.decoding import lean_generate
from ..models.generation import left_pad
from ..models.sampling import sample_next

# Where a pair's rejected response comes from (the buffer's `origin` column): the EMA's rewrite of a segment
# (SAPO), the data's own rejected answer, a whole answer by the previous iterate (SPIN), or none (SFT).
EMA_REWRITE, FROM_DATA, SPIN_ANSWER, CHOSEN_ONLY = "ema", "data", "spin", "sft"
ORIGINS = (EMA_REWRITE, FROM_DATA, SPIN_ANSWER, CHOSEN_ONLY)


@dataclass
class Pair:
    """A (chosen, rejected) pair ready for the buffer; ids are full sequences incl. the prompt."""

    chosen_ids: np.ndarray
    rejected_ids: np.ndarray
    prompt_len: int
    trunc_point: int
    segment_len: int
    origin: str = EMA_REWRITE


TAIL_KEPT, STOPPED, CUT_OFF = "tail kept", "ended by the EMA's stop token", "cut at the length limit"


def choose_truncation(
    response_len: int, prompt_len: int, segment_len: int, max_len: int, rng: np.random.Generator,
    short_rewrite: str = "official",
) -> tuple[int, int]:
    """(t, g): where the rewritten segment starts in the response, and its most tokens."""
    g = min(segment_len, response_len)
    if response_len - 3 - g > 0:
        high = min(response_len - 3 - g, max_len - prompt_len - g)
        return int(rng.integers(0, max(high, 0) + 1)), g
    if short_rewrite == "free":  # from the start, room for the EMA to finish its own answer
        return 0, max(min(segment_len, max_len - prompt_len), g)
    return 0, g


def pair_ending(
    rejected_ids: np.ndarray, prompt_len: int, t: int, g: int, stop_ids: Sequence[int]
) -> str:
    """How the rejected response ends: TAIL_KEPT, STOPPED or CUT_OFF (see the module docstring)."""
    segment_end = prompt_len + t + g
    if len(rejected_ids) > segment_end:  # only a kept tail runs past the segment
        return TAIL_KEPT
    stops = set(int(i) for i in stop_ids)
    segment = rejected_ids[prompt_len + t : segment_end]
    return STOPPED if any(int(tok) in stops for tok in segment) else CUT_OFF


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
    decoder: str = "lean",
) -> list[list[int]]:
    """Sample up to `max_new_tokens` tokens after each context in one batched call (KV cache on).

    Row i holds the tokens after contexts[i], pad_id after its first stop token; every row is as
    long as the steps run (all rows stop together, at the latest after `max_new_tokens`), as
    `generate` returns them. `decoder="lean"` decodes with the lean loop where the model allows it
    (see the module docstring); `"hf"` with `generate`, where `static_cache` preallocates the KV
    cache and on CUDA transformers then compiles the decoding step with torch.compile (slow first
    steps, faster after).
    """
    plan = plan_for(model, contexts, max_new_tokens) if decoder == "lean" else None
    try:
        if plan is not None:
            pick = partial(sample_next, temperature=temperature, top_k=top_k, top_p=top_p)
            return lean_generate(plan, contexts, max_new_tokens, pad_id, stop_ids, pick)
        return _hf_generate(model, contexts, max_new_tokens, pad_id, stop_ids, temperature, top_k, top_p,
                            static_cache)
    except RuntimeError as exc:
        if "probability tensor contains" not in str(exc):
            raise
        raise TrainingDiverged(
            "the EMA adapter's next-token probabilities are not finite: training has diverged",
            "lower `train.lr` and resume from the last good checkpoint with `sapo-lite train --resume RUN`",
        ) from exc



def _hf_generate(model: torch.nn.Module, contexts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                 stop_ids: Sequence[int], temperature: float, top_k: int, top_p: float,
                 static_cache: bool) -> list[list[int]]:
    """transformers' `generate` on a left-padded batch, as TRL's online trainers call it."""
    input_ids, attention_mask = left_pad(contexts, pad_id)
    device = next(model.parameters()).device
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
    return output[:, input_ids.shape[1] :].tolist()


@dataclass
class NewPairs:
    """The pairs of one generation round, and what happened to their rewrites."""

    pairs: list[Pair]
    identical: int
    """Rewrites identical to the chosen response at the first try (before any drop or resample)."""
    dropped: int
    resampled: int


def self_augment(
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
    decoder: str = "lean",
    short_rewrite: str = "official",
    identical: str = "keep",
    buffer_empty: bool = False,
) -> NewPairs:
    """Turn examples into (chosen, rejected) pairs; `model` must already be the EMA generator.

    Every truncation point is drawn first, in the order of `examples` (so a seed or a resumed
    run gives each example the same point whatever the batching). `buffer_empty`: the replay
    buffer holds nothing yet, so `identical="drop"` keeps the pairs if it would drop them all.
    """
    def rewrite(batch: Sequence) -> list[Pair]:
        cuts = [
            choose_truncation(len(ex.response_ids), len(ex.prompt_ids), segment_len, max_len, rng, short_rewrite)
            for ex in batch
        ]
        segments = _generate(model, batch, cuts, pad_id, stop_ids, gen_batch_size, sampling, static_cache, decoder)
        return [_pair(ex, t, g, segment, stop_ids) for ex, (t, g), segment in zip(batch, cuts, segments)]

    pairs = rewrite(examples)
    same = [i for i, pair in enumerate(pairs) if is_identical(pair)]
    same_set = set(same)
    dropped = resampled = 0
    if same and identical == "resample":
        for i, pair in zip(same, rewrite([examples[i] for i in same])):
            pairs[i] = pair
        resampled = len(same)
    elif same and identical == "drop" and not (buffer_empty and len(same) == len(pairs)):
        pairs = [pair for i, pair in enumerate(pairs) if i not in same_set]
        dropped = len(same)
    return NewPairs(pairs, len(same), dropped, resampled)


def is_identical(pair: Pair) -> bool:
    return np.array_equal(pair.chosen_ids, pair.rejected_ids)


def _pair(example, t: int, g: int, segment: Sequence[int], stop_ids: Sequence[int]) -> Pair:
    chosen = np.concatenate([example.prompt_ids, example.response_ids]).astype(np.int32)
    rejected = splice_rejected(example.prompt_ids, example.response_ids, t, g, segment, stop_ids)
    return Pair(chosen, rejected, len(example.prompt_ids), t, g)


def _generate(
    model, examples: Sequence, cuts: Sequence[tuple[int, int]], pad_id: int, stop_ids: Sequence[int],
    gen_batch_size: int, sampling: dict, static_cache: bool, decoder: str,
) -> list[list[int]]:
    """The EMA's segment after each P + R[:t]; batches take the contexts sorted by length, so a
    batch left-pads little and stops together."""
    contexts = [[*ex.prompt_ids.tolist(), *ex.response_ids[:t].tolist()] for ex, (t, _) in zip(examples, cuts)]
    order = sorted(range(len(examples)), key=lambda i: len(contexts[i]))
    segments: list[list[int]] = [[] for _ in examples]
    for start in range(0, len(order), gen_batch_size):
        batch = order[start : start + gen_batch_size]
        generated = generate_segments(
            model, [contexts[i] for i in batch], max(cuts[i][1] for i in batch), pad_id, stop_ids, **sampling,
            static_cache=static_cache, decoder=decoder,
        )
        for i, segment in zip(batch, generated):
            segments[i] = segment
    return segments


def chosen_only_pairs(examples: Sequence) -> list[Pair]:
    """Pairs with an empty rejected response, for a loss that trains on the chosen one alone (SFT):
    they go through the same buffer, so SFT sees the same examples in the same order as SAPO."""
    return [
        Pair(np.concatenate([ex.prompt_ids, ex.response_ids]).astype(np.int32), np.empty(0, np.int32),
             len(ex.prompt_ids), 0, 0, CHOSEN_ONLY)
        for ex in examples
    ]
