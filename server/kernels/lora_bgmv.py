"""Multi-LoRA for decode rows (Punica's BGMV): every row its own adapter, A and B read in place.

Semantics, for each row m with slot s = slots[m] and r_s = ranks[s] (0: the row's adapter does not
target this projection, or s is the base model's slot):

    t[m, r]  = sum_k x[m, k] * a[s, r, k]            for r < r_s          (shrink, fp32)
    y[m, n] += sum_{r < r_s} t[m, r] * b[s, n, r]                          (expand, into the base output)

Arguments:

    x      [M, K]        compute dtype, rows contiguous
    a      [S, R, K]     the stack of every resident adapter's A, padded to the server's largest rank R
    b      [S, N, R]     the stack of scaling * B
    ranks  [S]           int32, each slot's rank for this projection (0 = nothing to add)
    slots  [M]           int64, the slot of each row
    t      [M, R]        float32 workspace between the two launches
    y      [M, N]        compute dtype, the base projection's output, updated in place

Nothing is gathered: each program indexes the stacks by its row's slot, loads only the first r_s
ranks (masked, so no bytes past an adapter's own rank are read) and does nothing at all for rows
with r_s = 0. Grids depend only on M and the stacks' shapes and the metadata lives in device
tensors, so both launches can be captured once in a CUDA graph and replayed for any mix of adapters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_R = 16


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, ranks_ptr, slots_ptr, t_ptr, K, R, stride_xm,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    r_block = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    rank = tl.load(ranks_ptr + slot)
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    if r_block * BLOCK_R < rank:
        r_mask = offs_r < rank
        offs_k = tl.arange(0, BLOCK_K)
        a_rows = a_ptr + slot.to(tl.int64) * R * K + offs_r[:, None] * K
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + offs_k < K
            x = tl.load(x_ptr + row * stride_xm + k0 + offs_k, mask=k_mask, other=0.0)
            a = tl.load(a_rows + k0 + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(t_ptr + row * R + offs_r, acc, mask=r_mask)


@triton.jit
def _expand_kernel(t_ptr, b_ptr, ranks_ptr, slots_ptr, y_ptr, N, R, stride_ym,
                   R_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row)
    rank = tl.load(ranks_ptr + slot)
    if rank > 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, R_PAD)
        n_mask = offs_n < N
        r_mask = offs_r < rank
        t = tl.load(t_ptr + row * R + offs_r, mask=r_mask, other=0.0)                          # [R_PAD]
        b = tl.load(b_ptr + slot.to(tl.int64) * N * R + offs_n[:, None] * R + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)                          # [BN, R_PAD]
        delta = tl.sum(b.to(tl.float32) * t[None, :], axis=1)
        y_ptrs = y_ptr + row * stride_ym + offs_n
        y = tl.load(y_ptrs, mask=n_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


def lora_bgmv(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
    """y [M, N] += per-row LoRA delta of x [M, K] (see the module docstring); returns y."""
    m, k = x.shape
    _, r, _ = a.shape
    n = y.shape[1]
    t = torch.empty(m, r, dtype=torch.float32, device=x.device)
    _shrink_kernel[(m, triton.cdiv(r, _BLOCK_R))](x, a, ranks, slots, t, k, r, x.stride(0),
                                                  BLOCK_R=_BLOCK_R, BLOCK_K=256, num_warps=4)
    r_pad = max(16, triton.next_power_of_2(r))
    block_n = max(16, 4096 // r_pad)
    _expand_kernel[(m, triton.cdiv(n, block_n))](t, b, ranks, slots, y, n, r, y.stride(0),
                                                 R_PAD=r_pad, BLOCK_N=block_n, num_warps=4)
    return y
