"""Response log-probs without materialising the (batch, length, vocab) logits.

With Llama-3's 128k vocabulary the fp32 logits of one 2048-token sequence take 1 GB, and the
plain `log_softmax(logits)` path keeps several such tensors alive for backward. Here:

1. the decoder body runs once and returns hidden states (B, T, H);
2. only the positions that predict a response token are kept (prompt and padding positions
   never reach the output head, which also saves their matmuls);
3. those N positions go through the head in chunks of `chunk_tokens`; each chunk's logits
   live only inside a checkpointed function, so backward recomputes them one chunk at a time.

Peak memory of the log-prob part drops from O(N * V) to O(chunk_tokens * V), with the same
log-probs and gradients (tests/sapo/test_logps.py checks both).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256


def causal_lm_parts(model: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, output head) of a causal LM, through a PeftModel wrapper if there is one."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(causal_lm, causal_lm.base_model_prefix)
    return body, causal_lm.get_output_embeddings()


def _chunk_token_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()  # (chunk, V): the only vocab-sized tensor, one chunk at a time
    return -F.cross_entropy(logits, targets, reduction="none")


def score_positions(
    head: torch.nn.Module, picked: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Log-prob of each target token from its hidden state, (N,); the head sees `chunk_tokens` rows at a time."""
    score = functools.partial(_chunk_token_logps, head)
    pieces = []
    for start in range(0, picked.shape[0], chunk_tokens):
        chunk, chunk_targets = picked[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if torch.is_grad_enabled() and chunk.requires_grad:
            pieces.append(checkpoint(score, chunk, chunk_targets, use_reentrant=False))
        else:
            pieces.append(score(chunk, chunk_targets))
    # No scored position at all (every sequence is prompt only): an empty result that still backprops.
    return torch.cat(pieces) if pieces else picked.sum(-1).float()


def response_token_logps(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_mask: torch.Tensor,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens and their count, (B,) each.

    response_mask (B, T) marks the tokens to score; the token at t is predicted from position t-1.
    """
    body, head = causal_lm_parts(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    rows, cols = response_mask[:, 1:].nonzero(as_tuple=True)  # positions whose next token is scored
    targets = input_ids[rows, cols + 1]  # (N,)
    token_logps = score_positions(head, hidden[rows, cols], targets, chunk_tokens)
    batch = input_ids.shape[0]
    sums = torch.zeros(batch, dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    counts = torch.bincount(rows, minlength=batch).to(torch.float32)
    return sums, counts
