"""NF4 x bf16 matmul for decode-sized batches, reading bitsandbytes' packed layout in place.

Semantics (W is the weight bitsandbytes' `dequantize_4bit` returns, in the compute dtype):

    W[n, k] = dtype(code[q(n, k)] * absmax[n, k // 64])          (rounded once, as bnb rounds it)
    q(n, k) = packed[(n*K + k) // 2] >> 4  if k is even, else  & 0xF   (high nibble = element 2j)
    out[m, n] = sum_k x[m, k] * W[n, k]                           (fp32 accumulation)

so `out` equals bnb's dequantize + cuBLAS up to the order of accumulation. Arguments:

    x       [M, K]        compute dtype (bf16/fp16), rows contiguous
    packed  [N * K // 2]  uint8, bitsandbytes' packing of the row-major [N, K] weight
    absmax  [N * K // 64] float32, the block scales with double quantization already decoded
            (done once at load by bnb's own code: exact, see `decode_absmax`)
    code    [16]          float32, the NF4 values (bnb's quant_state.code)
    out     [M, N]        compute dtype

The weight is the only large operand, so the kernel is a stream over its bytes: each program
takes BLOCK_N output features and one K-range (split-K, so that a 4096-wide output fills all
multiprocessors even when M = 1), walks it one 64-wide scale block at a time, decodes the two
nibbles of each byte through the 16-entry table against the even and odd columns of x, and
either sums products on the FMA units (M = 1) or feeds the tensor cores with the weight
tile as the left operand (out^T = W x^T: the "swap AB" of small-M GEMMs). The M = 1 kernel reads
x and the weight as 32-bit words, one 64-block row per 8 words. With split-K each
K-range writes fp32 partial sums that a second small kernel adds in a fixed order, so results
do not depend on scheduling.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK = 64   # bitsandbytes' blocksize for NF4 (adapters.formats.nf4.BLOCK_SIZE)


@dataclass(frozen=True, slots=True)
class NF4Config:
    """Launch shape: features per program, rows per program (1 = the GEMV kernel), K-ranges, 64-blocks
    per loop step."""
    block_n: int
    block_m: int
    split_k: int
    groups: int
    num_warps: int = 4
    num_stages: int = 3


def decode_absmax(state) -> torch.Tensor:
    """bnb QuantState -> float32 absmax [N*K/64], exactly as bnb's dequantize_4bit computes it."""
    import bitsandbytes.functional as bnbf

    if not state.nested:
        return state.absmax.float().contiguous()
    absmax = bnbf.dequantize_blockwise(state.absmax, state.state2)
    return (absmax + state.offset).float().contiguous()


@triton.jit
def _code(code_addr, idx):
    """code[idx] through the L1 cache. Inline PTX rather than tl.load: a gather load makes Triton
    give the tile a layout of its own and shuffle every element through shared memory (seen in the
    compiled TTGIR), which cost 3x in the first version."""
    return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=r,l", [code_addr + idx.to(tl.int64) * 4],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_ptr, code_addr, out_ptr, N, K, per_split,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, PARTIAL: tl.constexpr):
    """M = 1. On the H200 it still trails bitsandbytes' own GEMV (0.58 against 0.76 TB/s at 4096x4096,
    BENCHMARKS.md), so NF4Linear (server/model/linear.py) runs it on fused weights (q|k|v, gate|up: one
    launch against one GEMV per weight) and sends a lone weight's single rows to bitsandbytes.
    x_ptr and packed_ptr are int32 views: a word of x is the bf16 pair (x[2i], x[2i+1]), a word of
    the weight 4 bytes = 8 elements; per-thread fp32 sums, one reduction at the end."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, 8)                       # word w of a 64-block: elements 8w..8w+7
    n_mask = offs_n < N
    k_blocks = K // 64
    words = (offs_n.to(tl.int64) * (K // 8))[:, None] + offs_w[None, :]
    acc = tl.zeros((BLOCK_N, 8), dtype=tl.float32)
    for step in range(0, per_split, GROUPS):
        for g in tl.static_range(GROUPS):
            b = pid_k * per_split + step + g
            live = b < k_blocks
            q = tl.load(packed_ptr + words + b * 8, mask=n_mask[:, None] & live, other=0)             # [BN, 8]
            scale = tl.load(absmax_ptr + offs_n * k_blocks + b, mask=n_mask & live, other=0.0)[:, None]
            for t in tl.static_range(4):           # byte t of each word: elements 8w+2t (high nibble), 8w+2t+1
                byte = q >> (8 * t)
                pair = tl.load(x_ptr + b * 32 + 4 * offs_w + t, mask=live, other=0)[None, :]            # [1, 8]
                w_even = (_code(code_addr, (byte >> 4) & 15) * scale).to(tl.bfloat16).to(tl.float32)
                w_odd = (_code(code_addr, byte & 15) * scale).to(tl.bfloat16).to(tl.float32)
                acc += w_even * (pair << 16).to(tl.float32, bitcast=True)
                acc += w_odd * (pair & -65536).to(tl.float32, bitcast=True)
    out = tl.sum(acc, axis=1)
    if PARTIAL:
        tl.store(out_ptr + pid_k * N + offs_n, out, mask=n_mask)
    else:
        tl.store(out_ptr + offs_n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _nf4_mma_kernel(x_ptr, packed_ptr, absmax_ptr, code_addr, out_ptr, M, N, K, stride_xm, per_split,
                    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, PARTIAL: tl.constexpr):
    """M >= 2: out^T tile [BLOCK_N, BLOCK_M] = W tile x^T on the tensor cores, one 64-block (K = 64)
    a product: the two nibbles of each byte are interleaved back into columns 2j, 2j+1 in registers,
    so x is read as contiguous rows."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, 32)                          # byte j of a 64-block holds columns 2j, 2j+1
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_blocks = K // 64
    row_bytes = (offs_n.to(tl.int64) * (K // 2))[:, None] + offs_j[None, :]
    x_rows = x_ptr + (offs_m.to(tl.int64) * stride_xm)[:, None] + tl.arange(0, 64)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for step in range(0, per_split, GROUPS):
        for g in tl.static_range(GROUPS):
            b = pid_k * per_split + step + g
            live = b < k_blocks
            q = tl.load(packed_ptr + row_bytes + b * 32, mask=n_mask[:, None] & live, other=0)          # [BN, 32]
            scale = tl.load(absmax_ptr + offs_n * k_blocks + b, mask=n_mask & live, other=0.0)[:, None]
            w_hi = (_code(code_addr, q >> 4) * scale).to(x_ptr.dtype.element_ty)
            w_lo = (_code(code_addr, q & 15) * scale).to(x_ptr.dtype.element_ty)
            w = tl.join(w_hi, w_lo).reshape(BLOCK_N, 64)                                              # [BN, 64]
            x = tl.load(x_rows + b * 64, mask=m_mask[:, None] & live, other=0.0)                      # [BM, 64]
            acc += tl.dot(w, tl.trans(x))
    acc = tl.trans(acc)                                                                                 # [BM, BN]
    out_offs = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(out_ptr + pid_k * M * N + out_offs, acc, mask=mask)
    else:
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(partial_ptr, out_ptr, total, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = sum over s of partial[s, i], s in order (deterministic), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + s * total + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def default_config(m: int, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> NF4Config:
    """Launch shape by batch size; from tests/bench/kernel_bench.py sweeps on an H200 (BENCHMARKS.md).
    The one-row GEMV reads x as bf16 pairs, so other dtypes take the tensor-core launch at one row too."""
    if m == 1 and dtype == torch.bfloat16:
        return NF4Config(block_n=64, block_m=1, split_k=8, groups=4)
    return NF4Config(block_n=128, block_m=16 if m <= 16 else 32 if m <= 32 else 64, split_k=8 if n <= 4096 else 4,
                     groups=1)


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int,
               config: NF4Config | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(packed, absmax, code)^T -> out [M, n] (allocated unless given), see the module docstring."""
    m, k = x.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    config = config or default_config(m, n, k, x.dtype)
    split_k = max(1, min(config.split_k, k // BLOCK))
    per_split = triton.cdiv(triton.cdiv(k // BLOCK, split_k), config.groups) * config.groups
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if split_k == 1 else torch.empty(split_k, m, n, dtype=torch.float32, device=x.device)
    launch = dict(GROUPS=config.groups, PARTIAL=split_k > 1, num_warps=config.num_warps, num_stages=config.num_stages)
    if config.block_m == 1:
        if m != 1 or x.dtype != torch.bfloat16:
            raise ValueError("the GEMV launch takes one bf16 row")
        x = x.contiguous()
        _nf4_gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
            x.view(torch.int32), packed.view(torch.int32), absmax, code.data_ptr(), target, n, k, per_split,
            BLOCK_N=config.block_n, **launch)
    else:
        grid = (triton.cdiv(n, config.block_n), split_k, triton.cdiv(m, config.block_m))
        _nf4_mma_kernel[grid](x, packed, absmax, code.data_ptr(), target, m, n, k, x.stride(0), per_split,
                              BLOCK_N=config.block_n, BLOCK_M=config.block_m, **launch)
    if split_k > 1:
        total = m * n
        _sum_splits_kernel[(triton.cdiv(total, 1024),)](target, out, total, SPLIT_K=split_k, BLOCK=1024)
    return out
