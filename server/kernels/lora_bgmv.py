"""Multi-LoRA for token rows (Punica's BGMV): every row its own adapter, A and B read in place, the
slices of a fused projection (q|k|v, gate|up) in one launch each for shrink and expand.

Semantics, for each slice p (a projection of the group), each row m with slot s = slots[m] and
r = ranks_p[s] (0: the row's adapter does not target projection p, or s is the base model's slot):

    t[p, m, i]  = sum_k x[m, k] * a_p[s, i, k]               for i < r            (shrink, fp32)
    y[m, c_p + n] += sum_{i < r} t[p, m, i] * b_p[s, n, i]    for n < N_p          (expand, into the base output)

where c_p is the slice's first column in y (the projections' outputs side by side). Arguments:

    x        [M, K]        compute dtype, rows contiguous
    a_p      [S, R, K]     the stack of every resident adapter's A for projection p, padded to the largest rank R
    b_p      [S, N_p, R]   the stack of scaling * B
    ranks_p  [S]           int32, each slot's rank for projection p (0 = nothing to add)
    slots    [M]           int64, the slot of each row
    t        [KS, P, M, R] float32 workspace between the two launches: KS K-ranges' partial sums
    y        [M, sum N_p]  compute dtype, the base projections' output, updated in place (rows may be strided)

Nothing is gathered: each program indexes the stacks by its row's slot, loads only the first r
ranks (masked, so no bytes past an adapter's own rank are read) and does nothing at all for rows
with r = 0. Grids depend only on M and the stacks' shapes and the metadata lives in device
tensors, so both launches can be captured once in a CUDA graph and replayed for any mix of adapters.
Up to three slices (q|k|v); the third argument set is unused with fewer.

The shrink splits K into ranges, one program each, so that a decode batch reads the stacks with
enough programs to fill the card (one program a row walked all of K: 10 µs for q|k|v at 32 rows of
the 7B shape, half of the LoRA time); the expand adds the ranges' partial t in a fixed order, so
the result does not depend on scheduling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_BLOCK_R = 16
_BLOCK_K = 512
_K_RANGES = 8        # shrink programs a (row, rank block, slice): K = 4096 is one 512-wide step each
MAX_SLICES = 3


@dataclass(frozen=True, slots=True)
class LoraSlice:
    """One projection's stacks (see the module docstring): a [S, R, K], b [S, N, R], ranks [S]."""
    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor


@triton.jit
def _shrink_kernel(x_ptr, a0, a1, a2, ranks0, ranks1, ranks2, slots_ptr, t_ptr, M, K, R, stride_xm, K_RANGE,
                   P: tl.constexpr, KS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    r_block = tl.program_id(1) // KS
    ks = tl.program_id(1) % KS
    p = tl.program_id(2)
    if p == 0:
        a_ptr, ranks_ptr = a0, ranks0
    elif p == 1:
        a_ptr, ranks_ptr = a1, ranks1
    else:
        a_ptr, ranks_ptr = a2, ranks2
    slot = tl.load(slots_ptr + row)
    rank = tl.load(ranks_ptr + slot)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    if r_block * BLOCK_R < rank:
        r_mask = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + slot.to(tl.int64) * R * K + offs_r[:, None] * K
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        k_end = tl.minimum(K, (ks + 1) * K_RANGE)
        for k0 in range(ks * K_RANGE, k_end, BLOCK_K):
            k_mask = k0 + offs_k < k_end
            x = tl.load(x_ptr + row * stride_xm + k0 + offs_k, mask=k_mask, other=0.0)
            a = tl.load(a_rows + k0 + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(t_ptr + ((ks * P + p) * M + row) * R + offs_r, acc, mask=r_mask)


@triton.jit
def _expand_kernel(t_ptr, b0, b1, b2, ranks0, ranks1, ranks2, n0, n1, n2, col0, col1, col2, slots_ptr, y_ptr,
                   M, R, stride_ym, P: tl.constexpr, KS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    n_block = tl.program_id(1)
    p = tl.program_id(2)
    if p == 0:
        b_ptr, ranks_ptr, N, col = b0, ranks0, n0, col0
    elif p == 1:
        b_ptr, ranks_ptr, N, col = b1, ranks1, n1, col1
    else:
        b_ptr, ranks_ptr, N, col = b2, ranks2, n2, col2
    slot = tl.load(slots_ptr + row)
    rank = tl.load(ranks_ptr + slot)
    if (rank > 0) & (n_block * BLOCK_N < N):
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        n_mask = offs_n < N
        r_mask = offs_r < rank
        t = tl.zeros((R_PAD,), dtype=tl.float32)
        for ks in tl.static_range(KS):                                    # in order: deterministic
            t += tl.load(t_ptr + ((ks * P + p) * M + row) * R + offs_r, mask=r_mask, other=0.0)   # [R_PAD]
        b = tl.load(b_ptr + slot.to(tl.int64) * N * R + offs_n[:, None] * R + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)                          # [BN, R_PAD]
        delta = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
        y_ptrs = y_ptr + row * stride_ym + col + offs_n
        y = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, slices: list[LoraSlice], slots: torch.Tensor) -> torch.Tensor:
    """y [M, sum N_p] += per-row LoRA delta of x [M, K] for each slice, side by side (module docstring); returns y."""
    if not 1 <= len(slices) <= MAX_SLICES:
        raise ValueError(f"{len(slices)} slices: one launch takes 1 to {MAX_SLICES}")
    m, k = x.shape
    r = slices[0].a.shape[1]
    widths = [s.b.shape[1] for s in slices]
    padded = [*slices, *[slices[0]] * (MAX_SLICES - len(slices))]
    columns = [sum(widths[:i]) for i in range(len(slices))] + [0] * (MAX_SLICES - len(slices))
    k_range = triton.cdiv(triton.cdiv(k, _K_RANGES), _BLOCK_K) * _BLOCK_K
    ranges = triton.cdiv(k, k_range)
    t = torch.empty(ranges, len(slices), m, r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(m, triton.cdiv(r, _BLOCK_R) * ranges, len(slices))](
        x, *(s.a for s in padded), *(s.ranks for s in padded), slots, t, m, k, r, x.stride(0), k_range,
        P=len(slices), KS=ranges, BLOCK_R=_BLOCK_R, BLOCK_K=_BLOCK_K, num_warps=4)
    r_pad = max(16, triton.next_power_of_2(r))
    block_n = max(16, 4096 // r_pad)
    _expand_kernel[(m, triton.cdiv(max(widths), block_n), len(slices))](
        t, *(s.b for s in padded), *(s.ranks for s in padded), *[s.b.shape[1] for s in padded], *columns, slots, y,
        m, r, y.stride(0), P=len(slices), KS=ranges, R_PAD=r_pad, BLOCK_N=block_n, num_warps=4)
    return y
