"""The lean sampler draws from the distribution `generate` draws from (temperature, top-k, top-p)."""

import numpy as np
import pytest
import torch
from helpers import random_contexts, tiny_mistral, with_random_adapters
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from sapo_lite.models.sampling import processed_scores, sample_next
from sapo_lite.sapo.augment import generate_segments

T, K, P = 0.7, 50, 0.95


def hf_processors():
    return LogitsProcessorList([TemperatureLogitsWarper(T), TopKLogitsWarper(K), TopPLogitsWarper(P)])


@pytest.mark.parametrize("scale", [1.0, 4.0, 15.0])  # flat to peaked: top-p keeps from all 50 to a few
def test_processed_probabilities_equal_transformers_warpers(scale):
    scores = torch.randn(16, 1000, generator=torch.Generator().manual_seed(int(scale))) * scale
    expected = hf_processors()(None, scores.clone())
    ours = processed_scores(scores.clone(), T, K, P)
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))  # the same tokens kept
    torch.testing.assert_close(ours.softmax(-1), expected.softmax(-1), atol=1e-7, rtol=1e-6)


def test_a_tie_at_the_kth_score_keeps_every_tied_token_as_transformers_does():
    scores = torch.randint(0, 6, (8, 300), generator=torch.Generator().manual_seed(0)).float()  # ties everywhere
    expected = hf_processors()(None, scores.clone())
    ours = processed_scores(scores.clone(), T, K, P)
    assert torch.equal(ours, expected)
    assert ((~torch.isinf(ours)).sum(-1) > K).any()  # more than K kept: the tie really was at the boundary


def test_non_finite_scores_raise_as_generate_does():
    scores = torch.randn(2, 300)
    scores[1, 5] = float("nan")
    with pytest.raises(RuntimeError, match="probability tensor contains"):
        sample_next(scores, T, K, P)


def first_token_counts(model, context, decoder, draws, vocab):
    counts = np.zeros(vocab, dtype=np.int64)
    for _ in range(draws // 500):
        rows = generate_segments(model, [context] * 500, 1, 0, [999], T, K, P, decoder=decoder)
        counts += np.bincount([row[0] for row in rows], minlength=vocab)
    return counts


def test_first_token_frequencies_match_generate():
    """20,000 first tokens from each path, against each other and against the exact processed distribution."""
    stats = pytest.importorskip("scipy.stats")
    base = tiny_mistral(seed=5, vocab_size=120)
    with torch.no_grad():
        base.lm_head.weight.mul_(6.0)  # peaked enough that temperature, top-k and top-p all cut something
    model = with_random_adapters(base, seed=6)
    context = random_contexts(21, [9], high=120)[0]
    torch.manual_seed(0)
    hf = first_token_counts(model, context, "hf", 20_000, 120)
    lean = first_token_counts(model, context, "lean", 20_000, 120)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context])).logits[:, -1].float()
    probs = hf_processors()(None, logits).softmax(-1)[0].double().numpy()
    support = probs > 0
    assert 3 <= support.sum() < K  # top-p cut the 50 top-k candidates down
    assert hf[~support].sum() == 0 and lean[~support].sum() == 0
    assert stats.chi2_contingency(np.stack([hf[support], lean[support]]))[1] > 1e-3
    for counts in (hf, lean):
        expected = probs[support] / probs[support].sum() * counts.sum()
        assert stats.chisquare(counts[support], expected).pvalue > 1e-3


def draws(scores, temperature, top_k, top_p, count):
    """`count` tokens drawn by the production sampler from one row of scores, as counts per token id."""
    torch.manual_seed(1)
    ids = sample_next(scores.expand(count, -1).contiguous(), temperature, top_k, top_p)
    return np.bincount(ids.numpy(), minlength=scores.shape[-1])


def test_sample_next_draws_the_distribution_of_transformers_warpers():
    stats = pytest.importorskip("scipy.stats")
    scores = torch.randn(1, 400, generator=torch.Generator().manual_seed(3)) * 5.0
    probs = hf_processors()(None, scores.clone()).softmax(-1)[0].double().numpy()
    counts = draws(scores, T, K, P, 20_000)
    support = probs > 0
    assert 3 <= support.sum() < K and counts[~support].sum() == 0  # top-p cut inside the top-k candidates
    assert stats.chisquare(counts[support], probs[support] / probs[support].sum() * 20_000).pvalue > 1e-3


def test_sample_next_keeps_every_token_tied_at_the_kth_score():
    """top_k 3 with four tokens tied for third place: transformers keeps all six, so must the sampler (its
    candidate route would see three)."""
    stats = pytest.importorskip("scipy.stats")
    scores = torch.full((1, 50), -5.0)
    scores[0, :6] = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    processed = TopKLogitsWarper(3)(None, scores.clone())
    probs = processed.softmax(-1)[0].double().numpy()
    counts = draws(scores, 1.0, 3, 1.0, 20_000)
    assert set(np.flatnonzero(counts)) == set(range(6))
    assert stats.chisquare(counts[:6], probs[:6] / probs[:6].sum() * 20_000).pvalue > 1e-3


def test_a_generation_config_with_top_h_is_decoded_by_generate():
    """transformers 5's entropy-based truncation is a warper the lean sampler does not apply."""
    from sapo_lite.models.decode_plan import why_not_lean

    model = tiny_mistral(seed=7)
    assert why_not_lean(model) is None
    model.generation_config.top_h = 0.4
    assert "top_h" in why_not_lean(model)
