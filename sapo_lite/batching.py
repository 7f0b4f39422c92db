"""From pairs to tensors: right-padded batches and per-sequence response log-probs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .augment import Pair
from .logps import DEFAULT_CHUNK_TOKENS, response_token_logps


def right_pad(
    sequences: Sequence[np.ndarray], prompt_lens: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, response_mask), each (B, T); response = tokens after the prompt."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    response = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (seq, prompt_len) in enumerate(zip(sequences, prompt_lens)):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        attention[row, : len(seq)] = 1
        response[row, prompt_len : len(seq)] = True
    return ids, attention, response


def pair_logps(
    model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, device: torch.device,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts of chosen and rejected, (B,) each.

    Chosen and rejected go through one forward as a batch of 2B sequences (B when no pair has a
    rejected response); the output head
    sees only response positions, `chunk_tokens` at a time.
    """
    # Pairs without rejected responses (SFT) send the chosen ones alone; rejected values are zeros.
    with_rejected = any(len(p.rejected_ids) for p in pairs)
    sequences = [p.chosen_ids for p in pairs] + ([p.rejected_ids for p in pairs] if with_rejected else [])
    prompt_lens = [p.prompt_len for p in pairs] * (2 if with_rejected else 1)
    ids, attention, response = right_pad(sequences, prompt_lens, pad_id)
    ids, attention, response = ids.to(device), attention.to(device), response.to(device)
    logps, counts = response_token_logps(model, ids, attention, response, chunk_tokens)
    n = len(pairs)
    if not with_rejected:
        return logps, torch.zeros_like(logps), counts, torch.zeros_like(counts)
    return logps[:n], logps[n:], counts[:n], counts[n:]
