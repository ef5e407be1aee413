"""Attention of every prompt chunk in a pass over the paged KV cache, in one launch. The torch path
(model.llama.Attention._chunk) runs a gather and an SDPA per chunk and layer: with 32 new prompts in a
pass that was about ten launches a chunk, 32 layers deep, before any maths.

Semantics, for chunk c whose rows r_c + i (i < n_c) hold positions s_c + i, query head h and its KV
head j = h // (H / KV) (grouped-query attention), token l of the request stored at
t(l) = tables[c, l // S] · S + l % S (S the block size), in fp32 with the compute dtype's products:

    x[i, l]          = scale · q[r_c + i, h, :] · k_cache[t(l), j, :]     for l = 0..s_c + i (causal)
    out[r_c + i, h]  = sum_l softmax_l(x[i, :]) · v_cache[t(l), j, :]

The chunk's own keys and values must already be in the cache (rope_cache writes them first), so a
chunk that continues a prompt, or follows a prefix-cache hit, reads its earlier tokens the same way.

Arguments:

    q        [T, H, D]              compute dtype, contiguous: the pass's chunk rows, chunk after chunk
    k_cache, v_cache [NB, S, KV, D] one layer's block pool, contiguous
    tables   [C, MB]                int32: chunk c's blocks in token order (entries past s_c + n_c unread)
    chunks   [C, 3]                 int32: (r_c, n_c, s_c), r_c the chunk's first row in q
    max_length                      max over c of n_c (host int: sizes the grid)
    out      [T, H, D]              compute dtype, written at every chunk row

One program per (chunk, query head, BLOCK_M query rows) walks keys 0..its last row's position in
BLOCK_N steps with flash attention's online softmax; both products run on the tensor cores
(tl.dot), the probabilities rounded to the compute dtype before the second as flash attention does.
Programs past a chunk's length exit at once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .decode_attention import paged_tile


# The block tables' width changes from pass to pass: left unspecialized, one compiled kernel serves every
# pass instead of a compile (hundreds of ms) whenever a width of a new kind (1, or a multiple of 16) comes.
@triton.jit(do_not_specialize=["stride_table"], do_not_specialize_on_alignment=["stride_table"])
def _prefill_attention_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, chunks_ptr, out_ptr, scale, H, KV, GROUP,
                              stride_table, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    first = tl.program_id(2) * BLOCK_M
    row0 = tl.load(chunks_ptr + chunk * 3).to(tl.int64)
    length = tl.load(chunks_ptr + chunk * 3 + 1)
    start = tl.load(chunks_ptr + chunk * 3 + 2)
    if first < length:
        offs_m = first + tl.arange(0, BLOCK_M)
        m_mask = offs_m < length
        query_pos = start + offs_m                                            # [BLOCK_M]
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < D
        rows = row0 + offs_m
        q_tile = (rows[:, None] * H + head) * D + offs_d[None, :]
        q = tl.load(q_ptr + q_tile, mask=m_mask[:, None] & d_mask[None, :], other=0.0)     # [BLOCK_M, D_PAD]
        kv_head = head // GROUP
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        last = start + tl.minimum(first + BLOCK_M, length) - 1                # the block's last query position
        key = 0
        while key <= last:   # a while, not a range: Triton's interpreter cannot take a loaded loop bound
            offs_n = key + tl.arange(0, BLOCK_N)
            kv_tile, kv_mask, n_mask = paged_tile(tables_ptr, chunk * stride_table, offs_n, last, kv_head, offs_d,
                                                  d_mask, KV, D, BLOCK_SIZE)
            k = tl.load(k_ptr + kv_tile, mask=kv_mask, other=0.0)                        # [BLOCK_N, D_PAD]
            x = tl.dot(q, tl.trans(k)) * scale                                          # [BLOCK_M, BLOCK_N] fp32
            causal = (offs_n[None, :] <= query_pos[:, None]) & n_mask[None, :]
            x = tl.where(causal, x, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(x, axis=1))
            alpha = tl.exp(m_i - m_new)
            probs = tl.exp(x - m_new[:, None])
            v = tl.load(v_ptr + kv_tile, mask=kv_mask, other=0.0)
            l_i = l_i * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs.to(v.dtype), v)
            m_i = m_new
            key += BLOCK_N
        out = acc / l_i[:, None]
        tl.store(out_ptr + q_tile, out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                      chunks: torch.Tensor, max_length: int) -> torch.Tensor:
    """q [T, H, D] of the pass's chunk rows -> out [T, H, D], each chunk causal over its request's tokens
    through `tables` (module docstring)."""
    total, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    out = torch.empty_like(q)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_m = 64 if max_length > 32 else 16
    grid = (chunks.shape[0], heads, triton.cdiv(max_length, block_m))
    _prefill_attention_kernel[grid](q, k_cache, v_cache, tables, chunks, out, head_dim ** -0.5, heads, kv_heads,
                                    heads // kv_heads, tables.stride(0), D=head_dim, D_PAD=d_pad,
                                    BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=64 if head_dim <= 64 else 32,
                                    num_warps=4)
    return out
