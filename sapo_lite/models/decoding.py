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
  but quantised bases and norms other than plain RMSNorm; q/k/v and gate/up each as one output
  tensor; the LoRA A matrices of a group stacked into one matmul; grouped-query attention without
  repeating K/V; what a family adds (q/k norms, sandwich norms, a RoPE table per layer type, a
  partial rotation, sliding-window layers) where the plan has it;
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
        rotary = _decode_rotary(plan, lengths, max_new_tokens)
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
            step_rotary = {key: (cos[:, step, None], sin[:, step, None]) for key, (cos, sin) in rotary.items()}
            logits = decode_step(plan, token, width + step, step_rotary, keys, values,
                                 bias.reshape(-1, bias.shape[2], seen))
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


def _decode_rotary(plan: DecodePlan, lengths: torch.Tensor,
                   new_tokens: int) -> dict[str | None, tuple[torch.Tensor, torch.Tensor]]:
    """Per RoPE table: cos and signed sin [B, steps, R] of every decode step (R: the rotated dimensions,
    head_dim unless the rotation is partial); row i's step s sits at position len_i + s.

    The sign of rotate_half is folded into sin (negation is exact), so a step's rotation is
    x * cos + swap_halves(x) * sin_signed."""
    positions = lengths[:, None] + torch.arange(max(new_tokens - 1, 1), device=lengths.device)[None, :]
    tables = {}
    for key, rotary in plan.rotaries.items():
        cos, sin = rotary(torch.empty(1, dtype=plan.dtype, device=lengths.device), positions)
        half = cos.shape[-1] // 2
        tables[key] = cos, torch.cat((-sin[..., :half], sin[..., half:]), -1)
    return tables


def prefill(plan: DecodePlan, contexts: Sequence[Sequence[int]], width: int, keys: torch.Tensor,
            values: torch.Tensor) -> torch.Tensor:
    """The contexts packed into one sequence; fills the cache; [B, V] fp32 logits of each last position."""
    device = plan.device
    lengths = [len(c) for c in contexts]
    ids = torch.tensor([token for c in contexts for token in c], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in lengths])
    h = plan.embed(ids)
    rotary = {}
    for key, table in plan.rotaries.items():
        cos, sin = table(h[None], positions[None])
        rotary[key] = cos[0, :, None], sin[0, :, None]  # [S, 1, R]: broadcast over heads
    for index, layer in enumerate(plan.layers):
        qkv = project(layer.input_norm(h), layer.qkv)
        attended = attend_prefill(plan, layer, qkv, *rotary[layer.rope], lengths, width, keys[index], values[index])
        h = _layer_end(layer, h, project(attended, layer.o))
    ends = torch.tensor(lengths, device=device).cumsum(0) - 1
    return _logits(plan, h.index_select(0, ends))


def decode_step(plan: DecodePlan, token: torch.Tensor, slot: int,
                rotary: dict[str | None, tuple[torch.Tensor, torch.Tensor]], keys: torch.Tensor, values: torch.Tensor,
                bias: torch.Tensor) -> torch.Tensor:
    """One token a row, written to cache `slot`; [B, V] fp32 logits. `rotary`: (cos, signed sin) [B, 1, R]
    per RoPE table; `bias`: the additive mask of slots [0, slot] as [B * KV heads, query heads a KV head,
    slot + 1]."""
    h = plan.embed(token)
    for index, layer in enumerate(plan.layers):
        qkv = project(layer.input_norm(h), layer.qkv)
        attended = attend_decode(plan, layer, qkv, *rotary[layer.rope], slot, keys[index], values[index], bias)
        h = _layer_end(layer, h, project(attended, layer.o))
    return _logits(plan, h)


def _layer_end(layer: LayerPlan, h: torch.Tensor, attention_out: torch.Tensor) -> torch.Tensor:
    """The residual adds after attention and MLP, with Gemma's sandwich norms where the layer has them."""
    if layer.attention_out_norm is not None:
        attention_out = layer.attention_out_norm(attention_out)
    h = h + attention_out
    mlp_out = _mlp(layer, layer.pre_mlp_norm(h))
    if layer.mlp_out_norm is not None:
        mlp_out = layer.mlp_out_norm(mlp_out)
    return h + mlp_out


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
    """Causal attention within each packed row (and within the layer's window); its keys and values go to
    cache slots [width - n, width)."""
    n_heads, n_kv, dim = plan.n_heads, plan.n_kv_heads, plan.head_dim
    heads = qkv.view(qkv.shape[0], n_heads + 2 * n_kv, dim)
    qk = _rotate(_normed_qk(layer, heads, n_heads, n_kv), cos, sin)
    v = heads[:, n_heads + n_kv :]
    out = torch.empty(qkv.shape[0], n_heads * dim, dtype=qkv.dtype, device=qkv.device)
    start = 0
    for row, n in enumerate(lengths):
        q_row = qk[start : start + n, :n_heads].transpose(0, 1)
        k_row, v_row = qk[start : start + n, n_heads:].transpose(0, 1), v[start : start + n].transpose(0, 1)
        store_kv(keys[row, :, :, width - n : width], values[row, :, width - n : width], k_row.transpose(1, 2), v_row)
        window = _window_mask(n, layer.window, qkv.device)
        attended = F.scaled_dot_product_attention(q_row[None], k_row[None], v_row[None], attn_mask=window,
                                                  is_causal=window is None, scale=layer.attention_scale,
                                                  enable_gqa=n_heads != n_kv)
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
    qk = _rotate_signed(_normed_qk(layer, heads, n_heads, n_kv), cos, sin_signed)
    store_kv(keys[..., slot], values[:, :, slot], qk[:, n_heads:], heads[:, n_heads + n_kv :])
    q = qk[:, :n_heads].reshape(batch * n_kv, group, dim)
    # a sliding-window layer sees the slots of the last `window` positions: a row's positions are consecutive
    # slots (left padding), so that is one slot range for every row
    first = 0 if layer.window is None else max(0, seen - layer.window)
    scores = torch.baddbmm(bias[..., first:], q, keys[..., first:seen].reshape(batch * n_kv, dim, seen - first),
                           alpha=layer.attention_scale)
    probs = scores.softmax(-1, dtype=torch.float32).to(scores.dtype)
    return torch.bmm(probs, values[:, :, first:seen].reshape(batch * n_kv, seen - first, dim)).view(
        batch, n_heads * dim)


def store_kv(key_slots: torch.Tensor, value_slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    key_slots.copy_(k)
    value_slots.copy_(v)


def _normed_qk(layer: LayerPlan, heads: torch.Tensor, n_heads: int, n_kv: int) -> torch.Tensor:
    """The query and key heads [tokens, n_heads + n_kv, D], through the layer's per-head norms if it has them."""
    qk = heads[:, : n_heads + n_kv]
    if layer.q_norm is None:
        return qk
    return torch.cat((layer.q_norm(qk[:, :n_heads]), layer.k_norm(qk[:, n_heads:])), 1)


def _window_mask(n: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """[n, n] True where query i sees key j: causal and i - j < window; None where plain causal is the same."""
    if window is None or n <= window:
        return None
    offsets = torch.arange(n, device=device)[:, None] - torch.arange(n, device=device)[None, :]
    return (offsets >= 0) & (offsets < window)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as transformers' apply_rotary_pos_emb computes it (rotate_half convention), over the first
    cos.shape[-1] dimensions of each head (all of them unless the rotation is partial, as Phi-4-mini's)."""
    rotated = cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((_rotate(x[..., :rotated], cos, sin), x[..., rotated:]), -1)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotate_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`_rotate` with the sign already in sin: one flip instead of a negation and a concatenation."""
    rotated = cos.shape[-1]
    if rotated < x.shape[-1]:
        return torch.cat((_rotate_signed(x[..., :rotated], cos, sin_signed), x[..., rotated:]), -1)
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * sin_signed
