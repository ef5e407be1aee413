"""Token rows' rotary embedding and paged KV-cache write in one launch (about fifteen torch kernels before:
the rotate-half products for q and k, two transposes and two scattered cache writes).

Semantics, for token row b written to cache slot t = slots[b] (block · block size + offset), half = D / 2, and rope(x)[d] = x[d]·cos[b, d] − x[d + half]·sin[b, d] for d < half,
x[d]·cos[b, d] + x[d − half]·sin[b, d] otherwise (model.rotate_half), in fp32, rounded once:

    q_out[b, h, :]      = rope(q[b, h·D:(h+1)·D])       for each query head h
    k_cache[t, j, :]    = rope(k[b, j·D:(j+1)·D])       for each KV head j   (the pool seen as [NB·S, KV, D])
    v_cache[t, j, :]    = v[b, j·D:(j+1)·D]

Arguments:

    q, k, v   [B, H·D], [B, KV·D], [B, KV·D]   compute dtype; rows may be strided (column slices of
              one fused q|k|v output), columns contiguous
    slots     [B]                int64, each row's cache slot
    cos, sin  [B, D]             the rows' rotary tables at their positions, rows may be strided (both
              halves equal, as transformers builds them)
    k_cache, v_cache [NB, S, KV, D]  one layer's block pool, contiguous
    q_out     [B, H, D]          written
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, slots_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, q_out_ptr,
                       stride_q, stride_k, stride_v, stride_rope, H, KV,
                       D: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    offs = tl.arange(0, HALF_PAD)
    mask = offs < HALF
    cos = tl.load(cos_ptr + row * stride_rope + offs, mask=mask).to(tl.float32)
    sin = tl.load(sin_ptr + row * stride_rope + offs, mask=mask).to(tl.float32)
    if head < H:
        src = q_ptr + row * stride_q + head * D
    else:
        src = k_ptr + row * stride_k + (head - H) * D
    x1 = tl.load(src + offs, mask=mask).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask).to(tl.float32)
    lo = x1 * cos - x2 * sin
    hi = x2 * cos + x1 * sin
    if head < H:
        dst = q_out_ptr + (row * H + head) * D
    else:
        j = head - H
        cache_offset = (slot * KV + j) * D
        dst = k_cache_ptr + cache_offset
        v_src = v_ptr + row * stride_v + j * D
        # v in the same two halves, so head dims that are not a power of two need no third shape
        tl.store(v_cache_ptr + cache_offset + offs, tl.load(v_src + offs, mask=mask), mask=mask)
        tl.store(v_cache_ptr + cache_offset + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)
    tl.store(dst + offs, lo.to(q_out_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + HALF + offs, hi.to(q_out_ptr.dtype.element_ty), mask=mask)


def rope_and_cache_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor) -> torch.Tensor:
    """Rotates q and k of B token rows, writes k and v into the cache (see the module docstring) -> q_out [B, H, D]."""
    rows = q.shape[0]
    _, _, kv_heads, head_dim = k_cache.shape
    heads = q.shape[-1] // head_dim
    q_out = torch.empty(rows, heads, head_dim, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(rows, heads + kv_heads)](
        q, k, v, slots, cos, sin, k_cache, v_cache, q_out, q.stride(0), k.stride(0), v.stride(0), cos.stride(0),
        heads, kv_heads, D=head_dim, HALF=head_dim // 2,
        HALF_PAD=triton.next_power_of_2(head_dim // 2), num_warps=1)
    return q_out
