"""`y (+)= alpha * x @ w.T` into a preallocated output: the one matmul of the lean decode loop.

Decoding a batch of a few rows is a matrix-vector product per weight, bound by how fast the
weights stream from memory. On the AMD CPUs here MKL's sgemm (what `F.linear` calls) runs its
AVX2 code path for these shapes, while oneDNN's linear (`torch.ops.mkldnn._linear_pointwise`)
runs AVX-512: 1.35x the decode tokens/s of SmolLM2 fp32 at batch 4 (bench/generation.py). That
op is an internal of torch, so it is used only after a check at first use that it exists and
gives `F.linear`'s result on this build, for a weight stored either way round (`weight_layout.py`:
stored [in, out] it streams faster still); otherwise, and for anything but fp32 on the CPU,
`F.linear` it is. Small weights (the LoRA matrices) go to `F.linear` too: a oneDNN call costs
about 15 us more, which below 64k elements is more than its faster arithmetic saves (at 4 rows:
64 x 576 takes 25 us through oneDNN and 7 us through `F.linear`; 1536 x 576, 266 and 573 us).

A weight that never changes while decoding runs (the output head: frozen, no adapter, and at 21% of
SmolLM2's bytes the largest matrix) can also be handed to oneDNN in its own blocked layout, made
once and kept (`packed_copy`): 1.4x the GB/s of the [in, out] layout for SmolLM2's 49152 x 576 head
at 4 rows (matmuls timed alone). It is a second copy of the weight, so only the head gets one.

No compiled code: a training tool must not compile C in its user's environment.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

_onednn_verified: bool | None = None  # None: not checked yet in this process
_packing_verified: bool | None = None
# weight -> (its data pointer and version when packed, the packed copy); gone with the weight
_packed_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()
PACKED_FOR_ROWS = 4  # the rows oneDNN lays a packed copy out for (a SAPO generation batch); any count works
ONEDNN_MIN_WEIGHT = 1 << 16  # elements; below it, oneDNN's per-call cost outweighs its arithmetic


def onednn_usable() -> bool:
    """oneDNN's linear exists in this torch and agrees with `F.linear` (checked once a process)."""
    global _onednn_verified
    if _onednn_verified is None:
        _onednn_verified = _check_onednn()
    return _onednn_verified


def _check_onednn() -> bool:
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    # both ways a weight may be stored: [N, K] and a [K, N] tensor's transpose (weight_layout.py)
    return _agrees_with_f_linear(_onednn_linear,
                                 lambda x, w: _onednn_linear(x, w.t().contiguous().t()))


def _onednn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _agrees_with_f_linear(*routes) -> bool:
    """Each route (x, w) -> x @ w.T gives `F.linear`'s result on a small sample; False where one raises (an
    op that exists in a build without its kernels)."""
    generator = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 72, generator=generator), torch.randn(5, 72, generator=generator)
    expected = F.linear(x, w)
    try:
        results = [route(x, w) for route in routes]
    except RuntimeError:
        return False
    return all(torch.allclose(got, expected, rtol=1e-5, atol=1e-5) for got in results)


def packing_usable() -> bool:
    """oneDNN can lay a weight out its own way, and its linear then gives `F.linear`'s result."""
    global _packing_verified
    if not onednn_usable():
        return False
    if _packing_verified is None:
        _packing_verified = _check_packing()
    return _packing_verified


def _check_packing() -> bool:
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return _agrees_with_f_linear(lambda x, w: matmul_packed(x, torch.ops.mkldnn._reorder_linear_weight(
        w.t().contiguous().t(), PACKED_FOR_ROWS)))


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a frozen fp32 CPU `weight` [out, in] (for `matmul_packed`), made at the first
    call and kept while the weight lives with the same memory and version; None where oneDNN's route is
    not taken. The caller vouches that nothing rewrites the weight's memory behind torch's back (a merged
    adapter's scratch does: never pass one)."""
    if (weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.requires_grad
            or weight.dim() != 2 or not packing_usable()):
        return None
    kept = _packed_copies.get(weight)
    key = (weight.data_ptr(), weight._version)
    if kept is None or kept[0] != key:
        kept = _packed_copies[weight] = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_ROWS))
    return kept[1]


def matmul_packed(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ w.T for 2-D x [M, K] and `packed_copy(w)`, any M."""
    return _onednn_linear(x.contiguous(), packed)


def matmul_t(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for 2-D x [M, K] and w [N, K], w stored either way round (`weight_layout.py`)."""
    if (x.device.type == "cpu" and x.dtype == w.dtype == torch.float32 and w.numel() >= ONEDNN_MIN_WEIGHT
            and (w.is_contiguous() or w.t().is_contiguous()) and onednn_usable()):
        return _onednn_linear(x.contiguous(), w)
    # F.linear for the rest, also a block of columns of a wider buffer (q of q/k/v side by side): MKL reads
    # it in place, where oneDNN took 15 ms instead of 0.04 for a 576 x 576 block of a 960-wide buffer
    return F.linear(x, w)


def linear_into(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, alpha: float = 1.0,
                accumulate: bool = False) -> torch.Tensor:
    """out = alpha * x @ w.T, or out += it with `accumulate`; `out` may be a column slice of a wider tensor."""
    product = matmul_t(x, w)
    if accumulate and product.dtype != out.dtype:  # fp32 LoRA on a bf16 base: added in fp32, as peft does
        out.copy_(out + product * alpha)
    elif accumulate:
        out.add_(product, alpha=alpha)
    elif alpha != 1.0:
        out.copy_(product.mul_(alpha))
    else:
        out.copy_(product)
    return out
