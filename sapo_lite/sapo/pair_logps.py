"""From pairs to tensors, and per-sequence response log-probs of chosen and rejected.

Two layouts, the same log-probs and gradients (tests/sapo/test_pair_logps.py checks both):

- shared prefix (the default): a SAPO pair's chosen and rejected sequences start with the same
  tokens, the prompt and the response up to the rewrite point (P + R[:t], often most of the
  sequence). One row per pair holds [shared prefix, chosen suffix, rejected suffix]; a 4D
  attention mask keeps the rejected suffix from seeing the chosen one, and its position ids
  restart where the prefix ends, so the rejected suffix attends to exactly what it would in its
  own sequence. The prefix goes through the model once, in the policy forward/backward and in
  the reference pass, and its response tokens go through the output head once for both sides.
- separate: chosen and rejected as a right-padded batch of 2B sequences. Used where a custom
  4D mask is not accepted (flash-attention and other kernels that take padding masks only).

With LoRA dropout the shared prefix sees one dropout mask for both sides instead of two
independent ones: a different random draw, not a different expectation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import Pair
from .logps import DEFAULT_CHUNK_TOKENS, causal_lm_parts, response_token_logps, score_positions

PACKABLE_ATTENTION = ("sdpa", "eager")  # the kernels that take an arbitrary 4D mask
# Architectures that place every token by its `position_ids` (rotary embeddings applied from them):
# the packed rejected suffix restarts its positions where the shared prefix ends, which only these
# honour. ALiBi, learned absolute positions with offsets and other schemes run the separate layout.
POSITION_IDS_ARCHITECTURES = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
    "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2", "stablelm",
})
SHARED, CHOSEN, REJECTED, PAD = 0, 1, 2, 3  # which part of a packed row a column belongs to


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


def shared_prefix_len(chosen: np.ndarray, rejected: np.ndarray) -> int:
    """Number of leading tokens the two sequences have in common."""
    n = min(len(chosen), len(rejected))
    differ = np.flatnonzero(np.asarray(chosen[:n]) != np.asarray(rejected[:n]))
    return int(differ[0]) if len(differ) else n


@dataclass
class PackedPairs:
    """One row per pair: [shared prefix, chosen suffix, rejected suffix], right-padded.

    Scored positions are listed once (`rows`, `cols`, `targets`); `entry_position` and
    `entry_owner` add each one's log-prob to chosen i (owner i) and/or rejected i (owner B + i):
    a response token inside the shared prefix counts for both.
    """

    input_ids: torch.Tensor  # (B, W)
    position_ids: torch.Tensor  # (B, W)
    part: torch.Tensor  # (B, W): SHARED, CHOSEN, REJECTED or PAD
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,) the position whose hidden state predicts the target
    targets: torch.Tensor  # (N,)
    entry_position: torch.Tensor  # (M,) index into the N scored positions
    entry_owner: torch.Tensor  # (M,) 0..2B-1
    shared_tokens: int  # tokens computed once instead of twice

    def attention_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B, 1, W, W): causal, no padding keys, rejected suffix blind to the chosen suffix.

        Boolean (True = attend) for sdpa; additive (0 or the dtype's minimum) when `dtype` is given, for eager.
        """
        part = self.part
        width = part.shape[1]
        index = torch.arange(width, device=part.device)
        causal = index[None, :] <= index[:, None]  # (W, W) query x key
        allowed = causal[None] & (part != PAD)[:, None, :]
        allowed &= ~((part == REJECTED)[:, :, None] & (part == CHOSEN)[:, None, :])
        allowed |= torch.eye(width, dtype=torch.bool, device=part.device)[None]  # padding queries see themselves
        allowed = allowed[:, None]
        if dtype is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=part.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )

    def to(self, device: torch.device) -> PackedPairs:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return PackedPairs(**moved)


def pack_pairs(pairs: Sequence[Pair], pad_id: int) -> PackedPairs:
    """The shared-prefix layout of `pairs` (see the module docstring)."""
    batch = len(pairs)
    rows_ids, rows_pos, rows_part = [], [], []
    rows, cols, targets, entry_position, entry_owner = [], [], [], [], []
    shared_total = 0

    def scored(row: int, col: int, target: int, *owners: int) -> None:
        for owner in owners:
            entry_position.append(len(rows))
            entry_owner.append(owner)
        rows.append(row)
        cols.append(col)
        targets.append(int(target))

    for i, pair in enumerate(pairs):
        chosen = np.asarray(pair.chosen_ids, dtype=np.int64)
        rejected = np.asarray(pair.rejected_ids, dtype=np.int64)
        shared = shared_prefix_len(chosen, rejected)
        n_chosen = len(chosen) - shared
        rows_ids.append(np.concatenate([chosen, rejected[shared:]]))
        rows_pos.append(np.concatenate([np.arange(len(chosen)), np.arange(shared, len(rejected))]))
        rows_part.append(np.repeat([SHARED, CHOSEN, REJECTED], [shared, n_chosen, len(rejected) - shared]))
        shared_total += shared
        first = max(pair.prompt_len, 1)  # the token at k is predicted from position k - 1
        for k in range(first, shared):
            scored(i, k - 1, chosen[k], i, batch + i)
        for k in range(max(first, shared), len(chosen)):
            scored(i, k - 1, chosen[k], i)
        for k in range(max(first, shared), len(rejected)):
            scored(i, k - 1 if k - 1 < shared else k - 1 + n_chosen, rejected[k], batch + i)

    width = max(len(r) for r in rows_ids)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    part = torch.full((batch, width), PAD, dtype=torch.long)
    for i, (ids, pos, prt) in enumerate(zip(rows_ids, rows_pos, rows_part)):
        input_ids[i, : len(ids)] = torch.from_numpy(ids)
        position_ids[i, : len(pos)] = torch.from_numpy(pos)
        part[i, : len(prt)] = torch.from_numpy(prt)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return PackedPairs(input_ids, position_ids, part, long(rows), long(cols), long(targets),
                       long(entry_position), long(entry_owner), shared_total)


def packable(model: torch.nn.Module) -> bool:
    """Whether the shared-prefix layout is exact for this model: its attention kernel takes the 4D mask
    and its architecture places tokens by `position_ids`."""
    return why_not_packable(model) is None


def why_not_packable(model: torch.nn.Module) -> str | None:
    """Why pairs must run as separate sequences for this model (one line), or None when they may be packed."""
    body, _ = causal_lm_parts(model)
    kernel = getattr(body.config, "_attn_implementation", None)
    if kernel not in PACKABLE_ATTENTION:
        return f"the {kernel} attention kernel takes no shared-prefix mask"
    model_type = getattr(body.config, "model_type", None)
    if model_type not in POSITION_IDS_ARCHITECTURES:
        return f"`{model_type}` models are not known to place tokens by position_ids"
    return None


def packed_pair_logps(
    model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, device: torch.device,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pair_logps` through the shared-prefix layout: one row per pair."""
    packed = pack_pairs(pairs, pad_id).to(device)
    body, head = causal_lm_parts(model)
    eager = body.config._attn_implementation == "eager"
    mask = packed.attention_mask(body.get_input_embeddings().weight.dtype if eager else None)
    hidden = body(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                  use_cache=False).last_hidden_state
    token_logps = score_positions(head, hidden[packed.rows, packed.cols], packed.targets, chunk_tokens)
    n = len(pairs)
    sums = torch.zeros(2 * n, dtype=torch.float32, device=device).index_add(
        0, packed.entry_owner, token_logps[packed.entry_position]
    )
    counts = torch.bincount(packed.entry_owner, minlength=2 * n).to(torch.float32)
    return sums[:n], sums[n:], counts[:n], counts[n:]


def separate_pair_logps(
    model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, device: torch.device,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, score=response_token_logps,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pair_logps` with chosen and rejected as one right-padded batch of 2B sequences (B when no
    pair has a rejected response)."""
    # Pairs without rejected responses (SFT) send the chosen ones alone; rejected values are zeros.
    with_rejected = any(len(p.rejected_ids) for p in pairs)
    sequences = [p.chosen_ids for p in pairs] + ([p.rejected_ids for p in pairs] if with_rejected else [])
    prompt_lens = [p.prompt_len for p in pairs] * (2 if with_rejected else 1)
    ids, attention, response = right_pad(sequences, prompt_lens, pad_id)
    ids, attention, response = ids.to(device), attention.to(device), response.to(device)
    logps, counts = score(model, ids, attention, response, chunk_tokens)
    n = len(pairs)
    if not with_rejected:
        return logps, torch.zeros_like(logps), counts, torch.zeros_like(counts)
    return logps[:n], logps[n:], counts[:n], counts[n:]


def pair_logps(
    model: torch.nn.Module, pairs: Sequence[Pair], pad_id: int, device: torch.device,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS, score=response_token_logps, shared_prefix: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts of chosen and rejected, (B,) each.

    The output head sees only response positions, `chunk_tokens` at a time. `score` is
    `response_token_logps` or, with several processes, the same run through DDP
    (`Processes.data_parallel`). `shared_prefix` None picks the shared-prefix layout wherever the
    attention kernel takes it and the forward is not DDP's: DDP averages gradients only through
    its own forward, which runs the separate layout.
    """
    if shared_prefix is None:
        shared_prefix = score is response_token_logps and packable(model)
    if shared_prefix:
        return packed_pair_logps(model, pairs, pad_id, device, chunk_tokens)
    return separate_pair_logps(model, pairs, pad_id, device, chunk_tokens, score)
