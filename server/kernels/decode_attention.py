"""Decode attention over the paged KV cache in one launch (about eight torch kernels before: a gather
of the blocks, two batched matmuls, cast, scale, mask, softmax, cast), reading only each row's own
positions, through its block table.

Semantics, for row b at position p = positions[b], query head h and its KV head j = h // (H / KV)
(grouped-query attention), token l of the row stored at t(l) = tables[b, l // S] · S + l % S (S the
block size), all in fp32:

    s[l]         = scale · q[b, h, :] · k_cache[t(l), j, :]          for l = 0..p
    out[b, h, :] = sum_l softmax(s)[l] · v_cache[t(l), j, :]

Arguments:

    q        [B, H, D]              compute dtype, contiguous (rotated, as rope_cache writes it)
    k_cache, v_cache [NB, S, KV, D] one layer's block pool, contiguous
    tables   [R, MB]                int32, R ≥ B: row b's blocks in token order (entries past its
                                    length are never read)
    positions [B]                   int64, each row's last position (inclusive)
    out      [B, H, D]              compute dtype, written

One program per (row, query head) walks its row's tokens in BLOCK_L steps with the online softmax of
flash attention, so the work follows each row's own length, not the longest row's: nothing is masked
but the tail of the last step. The loop bound is read from `positions` and the blocks from `tables` on
the device, so one captured graph serves every context length and every placement of blocks.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def paged_tile(tables_ptr, table, offs, last, kv_head, offs_d, d_mask, KV, D: tl.constexpr,
               BLOCK_SIZE: tl.constexpr):
    """Where a request's tokens `offs` [L] (those up to position `last`) sit in one layer's cache
    [NB, S, KV, D] for KV head `kv_head`: element offsets [L, D_PAD], their mask, and the tokens' mask.
    `table` points at the request's block table; entries past `last` are not read."""
    l_mask = offs <= last
    block = tl.load(tables_ptr + table + offs // BLOCK_SIZE, mask=l_mask, other=0).to(tl.int64)
    token = block * BLOCK_SIZE + offs % BLOCK_SIZE
    tile = (token[:, None] * KV + kv_head) * D + offs_d[None, :]
    return tile, l_mask[:, None] & d_mask[None, :], l_mask


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, positions_ptr, out_ptr, scale, H, KV, GROUP,
                             stride_table, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             BLOCK_L: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    p = tl.load(positions_ptr + row)
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < D
    q = tl.load(q_ptr + (row * H + head) * D + offs_d, mask=d_mask, other=0.0).to(tl.float32) * scale
    kv_head = head // GROUP
    m_i = tl.full((), float("-inf"), tl.float32)
    l_i = tl.zeros((), tl.float32)
    acc = tl.zeros((D_PAD,), tl.float32)
    start = 0
    while start <= p:   # a while, not a range: Triton's interpreter cannot take a loaded loop bound
        tile, tile_mask, l_mask = paged_tile(tables_ptr, row * stride_table, start + tl.arange(0, BLOCK_L), p,
                                             kv_head, offs_d, d_mask, KV, D, BLOCK_SIZE)
        k = tl.load(k_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)            # [BLOCK_L, D_PAD]
        s = tl.where(l_mask, tl.sum(k * q[None, :], axis=1), float("-inf"))           # [BLOCK_L]
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp(m_i - m_new)
        probs = tl.exp(s - m_new)
        v = tl.load(v_ptr + tile, mask=tile_mask, other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(probs, axis=0)
        acc = acc * alpha + tl.sum(probs[:, None] * v, axis=0)
        m_i = m_new
        start += BLOCK_L
    tl.store(out_ptr + (row * H + head) * D + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_mask)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """q [B, H, D] attending to each row's tokens 0..positions[b] through `tables` -> out [B, H, D]
    (module docstring)."""
    rows, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    d_pad = triton.next_power_of_2(head_dim)
    _decode_attention_kernel[(rows, heads)](q, k_cache, v_cache, tables, positions, out, head_dim ** -0.5, heads,
                                            kv_heads, heads // kv_heads, tables.stride(0), D=head_dim, D_PAD=d_pad,
                                            BLOCK_SIZE=block_size, BLOCK_L=max(16, 8192 // d_pad // 2), num_warps=4)
    return out
