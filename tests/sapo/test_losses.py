"""Losses against numbers worked out by hand."""

import math

import pytest
import torch

from sapo_lite.sapo.losses import LOSSES, dpo_loss, orpo_loss, response_logps


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_dpo_matches_hand_computation():
    pc, pr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0])
    rc, rr = torch.tensor([-11.0, -4.0]), torch.tensor([-11.0, -4.0])
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: (-10 - -12) - (-11 - -11) = 2  -> -log sigmoid(0.2)
    # pair 1: (-4 - -3) - (-4 - -4) = -1     -> -log sigmoid(-0.1)
    expected = [-math.log(sigmoid(0.2)), -math.log(sigmoid(-0.1))]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])


def test_orpo_matches_hand_computation():
    # chosen: 4 tokens summing to -2 (mean -0.5); rejected: 2 tokens summing to -3 (mean -1.5)
    out = orpo_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([4.0]), torch.tensor([2.0]), beta=0.05)
    pc, pr = math.exp(-0.5), math.exp(-1.5)
    log_odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
    expected = 0.5 - 0.05 * math.log(sigmoid(log_odds))
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.chosen_rewards.item() == pytest.approx(0.05 * -0.5)


def test_registry_says_which_loss_needs_the_reference():
    assert LOSSES["dpo"].needs_reference is True
    assert LOSSES["orpo"].needs_reference is False


def test_response_logps_sums_only_masked_tokens():
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[False, False, True, True]])
    total, count = response_logps(logits, ids, mask)
    logp = logits.log_softmax(-1)
    assert total.item() == pytest.approx((logp[0, 1, 2] + logp[0, 2, 3]).item(), rel=1e-5)
    assert count.item() == 2


def test_sft_is_the_token_mean_nll_of_the_chosen_response_and_needs_no_pair():
    from sapo_lite.sapo.losses import sft_loss

    # 3 tokens summing to -6 (mean -2) and 4 tokens summing to -2 (mean -0.5)
    out = sft_loss(torch.tensor([-6.0, -2.0]), torch.tensor([3.0, 4.0]))
    assert out.loss.tolist() == pytest.approx([2.0, 0.5])
    assert out.chosen_rewards is None and out.rejected_rewards is None
    spec = LOSSES["sft"]
    assert not spec.needs_rejected and not spec.needs_reference
    assert all(LOSSES[name].needs_rejected for name in ("dpo", "orpo"))


@pytest.mark.parametrize("x", [-1e-6, -1e-5, -1e-3, -0.1, -3.0])
def test_orpo_log_one_minus_p_is_exact_near_zero(x):
    """log(1 - exp(x)) in float32 against float64: the official log1p(-exp(x)) is off by 1.3e-2 at -1e-6."""
    from sapo_lite.sapo.losses import log1m_exp

    exact = math.log(-math.expm1(x))
    got = log1m_exp(torch.tensor([x], dtype=torch.float32)).item()
    assert got == pytest.approx(exact, rel=1e-6)
    naive = torch.log1p(-torch.exp(torch.tensor([x], dtype=torch.float32))).item()
    if x > -1e-4:
        assert abs(naive - exact) > 100 * abs(got - exact)  # the formula this replaces was the problem


def test_orpo_near_certainty_is_finite_and_still_has_a_gradient():
    """A chosen response at mean log-prob -1e-7 (a fine-tuned model on a short answer): the clamp of the
    old code (-1e-6) zeroed the odds term's gradient there; at exactly 0 the official code gives -inf."""
    for value in (-1e-7, 0.0):
        chosen = torch.tensor([value * 4], requires_grad=True)
        rejected = torch.tensor([-3.0], requires_grad=True)
        out = orpo_loss(chosen, rejected, torch.tensor([4.0]), torch.tensor([2.0]), beta=0.05)
        out.loss.sum().backward()
        assert torch.isfinite(out.loss).all() and torch.isfinite(chosen.grad).all()
        assert rejected.grad.item() > 0  # pushing the rejected response down lowers the loss
    chosen = torch.tensor([-4e-7], requires_grad=True)
    odds_only = orpo_loss(chosen, torch.tensor([-3.0]), torch.tensor([4.0]), torch.tensor([2.0]), beta=1.0)
    (odds_only.loss - (-chosen / 4)).sum().backward()  # the odds-ratio term alone
    assert chosen.grad.item() < 0  # raising the chosen response's probability still lowers the loss


def test_orpo_odds_term_has_the_right_sign_against_a_swapped_pair():
    """ORPO of (chosen better, rejected worse) is lower than the same pair swapped: a sign error in the
    odds-ratio term would invert this, while the NLL part alone cannot tell them apart."""
    better, worse, n = torch.tensor([-2.0]), torch.tensor([-6.0]), torch.tensor([4.0])
    right = orpo_loss(better, worse, n, n, beta=1.0).loss - 0.5  # minus the NLL of the chosen, 2/4
    swapped = orpo_loss(better, better - 0.0, n, n, beta=1.0).loss - 0.5
    assert right.item() < swapped.item() < math.log(2) + 1e-6 and abs(swapped.item() - math.log(2)) < 1e-6
