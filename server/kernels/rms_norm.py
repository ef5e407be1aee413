"""Residual add and RMSNorm in one launch (eight torch kernels before: add, float, pow, mean, add, rsqrt,
mul, cast, mul).

Semantics, for each row m (rounding to the compute dtype where torch rounds, so the result equals
model.RMSNorm of the torch residual add):

    h[m, :] = dtype(x[m, :] + delta[m, :])        (h = x when there is no delta: the first layer)
    y[m, :] = dtype(dtype(h * rsqrt(mean(h^2) + eps)) * weight)     (h, the mean and rsqrt in fp32)

Arguments:

    x       [M, D]  compute dtype, the residual stream, rows contiguous
    delta   [M, D]  compute dtype, what the previous sub-layer adds to it, or None
    weight  [D]     compute dtype
    y       [M, D]  written: the normalised rows, the next sub-layer's input
    h       [M, D]  written: the new residual stream (x itself when there is no delta)

One program a row holds the whole row in registers (D ≤ 16384), so the row is read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, y_ptr, h_ptr, D, eps,
                         HAS_DELTA: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    h = tl.load(x_ptr + row * D + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        h = (h.to(tl.float32) + tl.load(delta_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32))
        h = h.to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * D + offs, h, mask=mask)
    h32 = h.to(tl.float32)
    inv = tl.math.rsqrt(tl.sum(h32 * h32, axis=0) / D + eps)
    normed = (h32 * inv).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + offs, (normed * weight).to(y_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h) of the module docstring for x, delta [..., D]; h is x itself when delta is None."""
    d = x.shape[-1]
    rows = x.numel() // d
    x = x.contiguous()
    y = torch.empty_like(x)
    h = x if delta is None else torch.empty_like(x)
    _add_rms_norm_kernel[(rows,)](x, x if delta is None else delta.contiguous(), weight, y, h, d, eps,
                                  HAS_DELTA=delta is not None, BLOCK_D=triton.next_power_of_2(d),
                                  num_warps=4 if d <= 4096 else 8)
    return y, h
