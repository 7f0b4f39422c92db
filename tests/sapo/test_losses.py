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
