"""Next-token sampling with transformers' semantics, computed on the top-k candidates only.

`generate(do_sample=True, temperature=T, top_k=K, top_p=P)` applies, in this order,
TemperatureLogitsWarper (scores / T), TopKLogitsWarper (every score below the K-th largest to
-inf) and TopPLogitsWarper (sort ascending, softmax, cumulative sum; drop what sums to at most
1 - P, always keeping the largest), then draws from the softmax. Sorting and soft-maxing the whole
vocabulary (49,152 or 128,256 scores a row) for K = 50 survivors cost 8% of a SmolLM2 decode step.

Here the K largest scores are taken first, and top-p runs over them alone: the tokens outside
them have probability zero after top-k, so the softmax, the cumulative sums and the kept set are
the same. One case differs: HF's top-k keeps every score equal to the K-th largest, so a tie at
the boundary keeps more than K tokens; then the exact full-vocabulary computation runs instead
(`hf_processed_scores`, a transcription of the three warpers). The draw itself uses torch's
global generator, like `generate`; its random stream differs from HF's (a draw over K
candidates, not over the vocabulary), so a seeded run samples other tokens from the same
distribution (tests/models/test_sampling.py).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def hf_processed_scores(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] scores through temperature, top-k and top-p exactly as transformers' warpers compute them."""
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = torch.topk(scores, min(top_k, scores.size(-1)))[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, NEG_INF)
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False  # min_tokens_to_keep = 1
        scores = scores.masked_fill(remove.scatter(1, order, remove), NEG_INF)
    return scores


def top_k_candidates(scores: torch.Tensor, temperature: float, top_k: int,
                     top_p: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(candidate scores [B, K] with -inf where top-p drops them, their token ids [B, K]); None where only
    the full computation is exact: top-k off or as large as the vocabulary, or a tie at the K-th score."""
    if not top_k or top_k >= scores.shape[-1]:
        return None
    if temperature != 1.0:
        scores = scores / temperature
    values, ids = torch.topk(scores, top_k)  # descending
    if bool(((scores >= values[:, -1:]).sum(-1) != top_k).any()):
        return None
    if top_p < 1.0:
        ascending = values.flip(-1)
        remove = ascending.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        values = values.masked_fill(remove.flip(-1), NEG_INF)
    return values, ids


def processed_scores(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[B, V] processed scores (-inf outside the kept set), by the candidate route where it is exact."""
    candidates = top_k_candidates(scores, temperature, top_k, top_p)
    if candidates is None:
        return hf_processed_scores(scores, temperature, top_k, top_p)
    values, ids = candidates
    return torch.full_like(scores, NEG_INF).scatter_(1, ids, values)


def sample_next(scores: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One token id a row of [B, V] fp32 scores, distributed as `generate`'s sampler draws it.

    Non-finite scores (a diverged model) raise torch's "probability tensor contains ..." error, as in
    `generate`."""
    candidates = top_k_candidates(scores, temperature, top_k, top_p)
    if candidates is None:
        probs = hf_processed_scores(scores, temperature, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1).squeeze(1)
    values, ids = candidates
    return ids.gather(1, torch.multinomial(values.softmax(-1), 1)).squeeze(1)


def greedy(scores: torch.Tensor) -> torch.Tensor:
    """The greedy pick (`generate(do_sample=False)`): the highest score's id a row, the first on a tie."""
    return scores.argmax(-1)
