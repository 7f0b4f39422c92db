"""Preference losses as pure functions of per-sequence log-prob tensors.

Each loss takes (B,) tensors of summed response log-probs (and token counts, for ORPO's
per-token means) and returns the (B,) loss plus the figures worth logging. `LOSSES` is the
registry the trainer reads; `needs_reference` tells it whether reference log-probs must be
computed when a pair enters the buffer, `needs_rejected` whether the EMA must write rejected
responses at all (`sft`, the baseline, trains on the chosen responses alone).

The DPO formula (sigmoid, summed response log-probs) and the odds-ratio term are the official
code's. Departure, on purpose: ORPO's NLL.
- sapo-lite: each chosen response's mean token NLL (response tokens only), then the mean over
  the batch, so every example counts the same.
- official: one cross-entropy pooled over every token of the batch, prompt and padding included
  (the labels there are the input ids, padding unmasked), so long sequences and the batch's
  padding weigh in.
Kept per sequence because the loss should measure what the policy is asked to produce, not
prompts or pad tokens, and because a per-sequence mean makes gradient accumulation exact: a
pool over one micro-batch is not a pool over the optimizer batch, so pooled results would
change with `train.micro_batch`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossOutput:
    loss: torch.Tensor  # (B,)
    chosen_rewards: torch.Tensor | None  # (B,), detached; None for a loss without rejected responses
    rejected_rewards: torch.Tensor | None  # (B,), detached


@dataclass
class PairLogps:
    """Summed log-probs of the response tokens of each chosen/rejected sequence, and counts."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
) -> LossOutput:
    """Sigmoid DPO: -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    loss = -F.logsigmoid(beta * logits)
    return LossOutput(
        loss,
        (beta * (policy_chosen - ref_chosen)).detach(),
        (beta * (policy_rejected - ref_rejected)).detach(),
    )


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float,
) -> LossOutput:
    """ORPO: NLL(chosen, token mean) - beta * log sigmoid(log odds(chosen) - log odds(rejected)).

    log odds(p) = log p - log(1 - p) with p the per-token mean probability exp(mean logp);
    `beta` is ORPO's lambda. Rewards are beta * mean logp, as in the ORPO paper's logs.
    """
    mean_chosen = policy_chosen / chosen_tokens.clamp(min=1)
    mean_rejected = policy_rejected / rejected_tokens.clamp(min=1)
    log_odds = (mean_chosen - mean_rejected) - (log1m_exp(mean_chosen) - log1m_exp(mean_rejected))
    loss = -mean_chosen - beta * F.logsigmoid(log_odds)
    return LossOutput(loss, (beta * mean_chosen).detach(), (beta * mean_rejected).detach())


# A mean token log-prob above this is treated as this: log(1 - p) stays finite (about -27.6) where the
# official code's log1p(-exp(0)) gives -inf. Only a response whose every token has p > 1 - 1e-12 gets there.
MAX_MEAN_LOGP = -1e-12


def log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, exact near 0: log(-expm1(x)).

    The official code's log1p(-exp(x)) loses the digits that matter near 0 (float32: error 1.3e-2
    at x = -1e-6, 1.4e-3 at -1e-5), and clamping x at -1e-6 to keep it finite zeroed the gradient
    of every response whose mean token probability is above 0.999999, which a fine-tuned model
    reaches on short answers.
    """
    return torch.log(-torch.expm1(x.clamp(max=MAX_MEAN_LOGP)))


def sft_loss(policy_chosen: torch.Tensor, chosen_tokens: torch.Tensor) -> LossOutput:
    """Supervised fine-tuning: NLL of the chosen response, token mean per sequence (ORPO without
    its odds-ratio term). No rejected response, no reference, hence no rewards."""
    return LossOutput(-policy_chosen / chosen_tokens.clamp(min=1), None, None)


@dataclass(frozen=True)
class LossSpec:
    fn: Callable[[PairLogps, float], LossOutput]
    needs_reference: bool
    description: str
    needs_rejected: bool = True


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec(
        lambda lp, beta: dpo_loss(lp.policy_chosen, lp.policy_rejected, lp.ref_chosen, lp.ref_rejected, beta),
        needs_reference=True,
        description="sigmoid DPO against the frozen reference (beta 0.1)",
    ),
    "orpo": LossSpec(
        lambda lp, beta: orpo_loss(
            lp.policy_chosen, lp.policy_rejected, lp.chosen_tokens, lp.rejected_tokens, beta
        ),
        needs_reference=False,
        description="odds-ratio preference loss plus NLL, reference-free (lambda 0.05)",
    ),
    "sft": LossSpec(
        lambda lp, beta: sft_loss(lp.policy_chosen, lp.chosen_tokens),
        needs_reference=False,
        needs_rejected=False,
        description="plain SFT on the chosen responses: no generation, no rejected responses (a baseline)",
    ),
}


def response_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the masked tokens and their count, per sequence.

    logits (B, T, V) predict input_ids shifted by one; response_mask (B, T) marks the
    tokens to score. cross_entropy avoids materialising a second (B, T, V) log_softmax.
    """
    targets = input_ids[:, 1:]
    mask = response_mask[:, 1:].to(logits.dtype)
    token_logps = -F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), targets, reduction="none"
    )  # (B, T-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
