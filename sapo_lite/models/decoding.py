"""The lean decode loop: a batch of contexts in, up to N sampled tokens a row out, as `generate` would.

`generate` on a PeftModel spends most of a decode step outside the matmuls that must read the
weights: per-token Python in generate, peft's per-layer dispatch and the LoRA's separate
small matmuls, logits processors over the whole vocabulary, a cache that grows by
concatenation (bench/generation.py puts the split in docs/memory-and-speed.md). For the short, known-length
rewrites SAPO asks for, this loop does only the arithmetic:

- one packed prefill: the contexts concatenated without pad tokens, attention within each row
  (causal), logits of each row's last position only;
- a KV cache preallocated for context + N tokens, laid out as left padding would be (row i's
  context ends at the same slot for every row; padded slots are masked), so decode step s writes
  one slot for the whole batch;
- one forward a token, written against the plan's tensors (`decode_plan.py`), no module calls
  but quantised bases; q/k/v and gate/up each as one output tensor; the LoRA A matrices of a
  group stacked into one matmul; grouped-query attention without repeating K/V;
- sampling by the function the caller passes (HF-equivalent: `sampling.py`; greedy: argmax);
- stops as soon as every row has produced a stop token.

The output is what `generate` returns after the context: every row as long as the number of
steps run, pad_id after a row's first stop token. The same greedy tokens as `generate` on the
same model (tests/models/test_decoding.py); float results agree with it to rounding, not bits
(different kernels, one packed prefill).

The functions a step is made of are module-level names so that bench/generation.py can time
each kind of work (base matmuls, LoRA, attention, cache writes) without instrumenting this file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .decode_plan import DecodePlan, LayerPlan, ProjectionGroup
from .matmul import linear_into, matmul_packed, matmul_t

Picker = Callable[[torch.Tensor], torch.Tensor]  # [B, V] fp32 logits -> [B] token ids


def lean_generate(plan: DecodePlan, contexts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                  stop_ids: Sequence[int], pick: Picker) -> list[list[int]]:
    """Up to `max_new_tokens` tokens after each (non-empty) context; see the module docstring."""
    device, batch = plan.device, len(contexts)
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    width = int(lengths.max())
    slots = width + max_new_tokens
    with torch.inference_mode():
        keys, values = kv_cache(plan, batch, slots)
        mask = torch.zeros(batch, 1, 1, slots, dtype=plan.dtype, device=device)  # additive: 0 or -inf
        padded = torch.arange(slots, device=device)[None, :] < (width - lengths)[:, None]
        mask.masked_fill_(padded.view(batch, 1, 1, slots), float("-inf"))
        cos, sin_signed = _decode_rotary(plan, lengths, max_new_tokens)
        stops = torch.tensor(sorted({int(s) for s in stop_ids}), dtype=torch.long, device=device)
        out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)

        logits = prefill(plan, contexts, width, keys, values)
        steps = 0
        for step in range(max_new_tokens):
            token = torch.where(done, pad_id, pick(logits))
            out[:, step] = token
            done |= torch.isin(token, stops)
            steps = step + 1
            if steps == max_new_tokens or bool(done.all()):
                break
            seen = width + step + 1  # the mask as every layer adds it to its scores: built once a step
            bias = mask[..., :seen].expand(batch, plan.n_kv_heads, plan.n_heads // plan.n_kv_heads, seen)
            logits = decode_step(plan, token, width + step, cos[:, step, None], sin_signed[:, step, None],
                                 keys, values, bias.reshape(-1, bias.shape[2], seen))
        return out[:, :steps].tolist()


def kv_cache(plan: DecodePlan, batch: int, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [layers, B, KV heads, D, slots], stored transposed so a step's scores are q @ keys[..., :seen]
    with no transpose (SmolLM2, batch 4, 2 threads: 34 instead of 52 us a layer timed alone; with the
    mask built once a step, the work of a decode step besides its matmuls went from 8.5 to 8.0 ms), and
    values [layers, B, KV heads, slots, D]. Zeros, not empty: masked slots still enter q @ k and p @ v,
    and garbage there could be inf or nan."""
    layers, kv_heads, dim = len(plan.layers), plan.n_kv_heads, plan.head_dim
    keys = torch.zeros(layers, batch, kv_heads, dim, slots, dtype=plan.dtype, device=plan.device)
    return keys, torch.zeros(layers, batch, kv_heads, slots, dim, dtype=plan.dtype, device=plan.device)


def _decode_rotary(plan: DecodePlan, lengths: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [B, steps, D] of every decode step: row i's step s sits at position len_i + s.

    The sign of rotate_half is folded into sin (negation is exact), so a step's rotation is
    x * cos + swap_halves(x) * sin_signed."""
    positions = lengths[:, None] + torch.arange(max(new_tokens - 1, 1), device=lengths.device)[None, :]
    cos, sin = plan.rotary(torch.empty(1, dtype=plan.dtype, device=lengths.device), positions)
    half = plan.head_dim // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)


def prefill(plan: DecodePlan, contexts: Sequence[Sequence[int]], width: int, keys: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor:
    """The contexts packed into one sequence; fills the cache; [B, V] fp32 logits of each last position."""
    device = plan.device
    lengths = [len(c) for c in contexts]
    ids = torch.tensor([token for c in contexts for token in c], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    h = plan.embed(ids)
    cos, sin = plan.rotary(h[None], positions[None])
    cos, sin = cos[0, :, None], sin[0, :, None]  # [S, 1, D]: broadcast over heads
    for index, layer in enumerate(plan.layers):
        qkv = project(layer.input_norm(h), layer.qkv)
        attended = attend_prefill(plan, layer, qkv, cos, sin, lengths, width, keys[index], values[index])
        h = h + project(attended, layer.o)
        h = h + _mlp(layer, layer.post_attention_norm(h))
    ends = torch.tensor(lengths, device=device).cumsum(0) - 1
    return _logits(plan, h.index_select(0, ends))


def decode_step(plan: DecodePlan, token: torch.Tensor, slot: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """One token a row, written to cache `slot`; [B, V] fp32 logits. `bias`: the additive mask of slots
    [0, slot] as [B * KV heads, query heads a KV head, slot + 1]."""
    h = plan.embed(token)
    for index, layer in enumerate(plan.layers):
        qkv = project(layer.input_norm(h), layer.qkv)
        attended = attend_decode(plan, layer, qkv, cos, sin_signed, slot, keys[index], values[index], bias)
        h = h + project(attended, layer.o)
        h = h + _mlp(layer, layer.post_attention_norm(h))
    return _logits(plan, h)


def _mlp(layer: LayerPlan, x: torch.Tensor) -> torch.Tensor:
    gate_up = project(x, layer.gate_up)
    inter = layer.intermediate
    return project(layer.act(gate_up[:, :inter]) * gate_up[:, inter:], layer.down)


def _logits(plan: DecodePlan, h_last: torch.Tensor) -> torch.Tensor:
    return project(plan.final_norm(h_last), plan.head).float()


# ---------------------------------------------------------------- projections


def project(x: torch.Tensor, group: ProjectionGroup) -> torch.Tensor:
    """[M, group.width]: every projection of the group applied to x, base and adapter."""
    out = project_base(x, group)
    if any(part.lora is not None for part in group.parts):
        project_lora(x, group, out)
    return out


def project_base(x: torch.Tensor, group: ProjectionGroup) -> torch.Tensor:
    """The base projections' output, a fresh tensor: one matmul where the group's weights are one
    (`joined`, or a single projection), else each part into its columns."""
    if group.packed is not None:
        return matmul_packed(x, group.packed)
    single = group.parts[0] if len(group.parts) == 1 else None
    if group.joined is not None or (single is not None and single.weight is not None and single.bias is None):
        return matmul_t(x, group.joined if group.joined is not None else single.weight)
    out = torch.empty(x.shape[0], group.width, dtype=x.dtype, device=x.device)
    start = 0
    for part in group.parts:
        y = out[:, start : start + part.out_features]
        if part.weight is not None:
            linear_into(x, part.weight, y)
            if part.bias is not None:
                y.add_(part.bias)
        else:
            y.copy_(part.module(x))
        start += part.out_features
    return out


def project_lora(x: torch.Tensor, group: ProjectionGroup, out: torch.Tensor) -> None:
    """out += scaling * (x @ A^T) @ B^T per part, as peft adds it (input cast to the adapter's dtype)."""
    if group.stacked_a is not None:
        a_out = torch.empty(x.shape[0], group.stacked_a.shape[0], dtype=group.stacked_a.dtype, device=x.device)
        linear_into(x.to(group.stacked_a.dtype), group.stacked_a, a_out)
        rank_rows = [a_out[:, first:last] for first, last in group.rank_slices]
    else:
        rank_rows = [None if p.lora is None else F.linear(x.to(p.lora[0].dtype), p.lora[0]) for p in group.parts]
    start = 0
    for part, rows in zip(group.parts, rank_rows):
        if part.lora is not None:
            _, b, scaling = part.lora
            linear_into(rows, b, out[:, start : start + part.out_features], alpha=scaling, accumulate=True)
        start += part.out_features


# ---------------------------------------------------------------- attention


def attend_prefill(plan: DecodePlan, layer: LayerPlan, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   lengths: list[int], width: int, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Causal attention within each packed row; its keys and values go to cache slots [width - n, width)."""
    n_heads, n_kv, dim = plan.n_heads, plan.n_kv_heads, plan.head_dim
    heads = qkv.view(qkv.shape[0], n_heads + 2 * n_kv, dim)
    qk = _rotate(heads[:, : n_heads + n_kv], cos, sin)
    v = heads[:, n_heads + n_kv :]
    out = torch.empty(qkv.shape[0], n_heads * dim, dtype=qkv.dtype, device=qkv.device)
    start = 0
    for row, n in enumerate(lengths):
        q_row = qk[start : start + n, :n_heads].transpose(0, 1)
        k_row, v_row = qk[start : start + n, n_heads:].transpose(0, 1), v[start : start + n].transpose(0, 1)
        store_kv(keys[row, :, :, width - n : width], values[row, :, width - n : width], k_row.transpose(1, 2), v_row)
        attended = F.scaled_dot_product_attention(q_row[None], k_row[None], v_row[None], is_causal=True,
                                                  scale=layer.attention_scale, enable_gqa=n_heads != n_kv)
        out[start : start + n].view(n, n_heads, dim).copy_(attended[0].transpose(0, 1))
        start += n
    return out


def attend_decode(plan: DecodePlan, layer: LayerPlan, qkv: torch.Tensor, cos: torch.Tensor,
                  sin_signed: torch.Tensor, slot: int, keys: torch.Tensor, values: torch.Tensor,
                  bias: torch.Tensor) -> torch.Tensor:
    """One query a row against cache slots [0, slot]; the query heads of one KV head side by side.
    `keys` [B, KV, D, slots] (transposed), `values` [B, KV, slots, D]."""
    batch = qkv.shape[0]
    n_heads, n_kv, dim = plan.n_heads, plan.n_kv_heads, plan.head_dim
    group, seen = n_heads // n_kv, slot + 1
    heads = qkv.view(batch, n_heads + 2 * n_kv, dim)
    qk = _rotate_signed(heads[:, : n_heads + n_kv], cos, sin_signed)
    store_kv(keys[..., slot], values[:, :, slot], qk[:, n_heads:], heads[:, n_heads + n_kv :])
    q = qk[:, :n_heads].reshape(batch * n_kv, group, dim)
    scores = torch.baddbmm(bias, q, keys[..., :seen].reshape(batch * n_kv, dim, seen), alpha=layer.attention_scale)
    probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
    return torch.bmm(probs, values[:, :, :seen].reshape(batch * n_kv, seen, dim)).view(batch, n_heads * dim)


def store_kv(key_slots: torch.Tensor, value_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    key_slots.copy_(k)
    value_slots.copy_(v)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' apply_rotary_pos_emb computes it (rotate_half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`_rotate` with the sign already in sin: one flip instead of a negation and a concatenation."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed
