"""NF4 x bf16/fp16 matmul for decode-sized batches: a tensor-core CUDA kernel compiled at run time.

Semantics (the weight in nf4_layout's order; `dtype` is x's, bf16 or fp16):

    out[m, n] = 2^-shift * sum_b scale[n, b] * sum_{k in 64-block b} dtype(code[q(n, k)]) * x[m, k]
    scale[n, b] = fp16(absmax[n, b] * 2^shift)                       (nf4_layout.repack)

with fp32 products and sums. bitsandbytes' dequantize-then-matmul instead rounds each weight once,
dtype(code * absmax), and multiplies that. The two differ by the rounding of a bf16 weight
(relative 2^-9 per element, averaging out over K) plus fp16's 2^-12 on each block scale: the
tests hold the kernel to 1e-3 relative L2 against a float64 evaluation of the formula above, and
to bf16's usual 1e-2 against bnb's dense weight. Arguments:

    x       [M, K]   compute dtype, 16-byte aligned rows (K a multiple of 64)
    packed  PackedNF4 of the [N, K] weight (N a multiple of 16)
    out     [M, N]   compute dtype, contiguous

Why a CUDA kernel (nf4_matmul.cu) rather than Triton: the speed comes from each lane's 16-byte
load landing in the registers of its tensor-core fragment, decoded by a `prmt` register table (8
codes in 21 instructions, no table loads) and fed to `mma.sync` with no trip through shared memory;
Triton picks its own register layouts and would shuffle the decoded tile. NVRTC, which ships with
every CUDA build of torch, compiles it at first use: no compiler is needed on the host.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from .nf4_layout import BLOCK, SLAB, PackedNF4

SOURCE = "".join((Path(__file__).parent / name).read_text() for name in ("nf4_decode.cu", "nf4_matmul.cu"))
MAX_TILE_ROWS = 64          # batch rows one launch column covers (8 MMA tiles of 8); more go to gridDim.z


@dataclass(frozen=True, slots=True)
class NF4Config:
    """Launch shape: warps per CTA, 16-row slabs per warp, 64-blocks per pipeline chunk, ring depth,
    K-ranges (split-K), and where the decode table lives (False: registers, True: shared memory)."""
    warps: int
    slabs: int
    group: int
    stages: int
    split_k: int
    smem_table: bool = False


def default_config(m: int, n: int, k: int) -> NF4Config:
    """From tests/bench/kernel_bench.py sweeps on an H100 (BENCHMARKS.md). Up to 4 tiles (M = 32), the
    shared-memory table and two slabs a warp (each x fragment feeds both) won at every 7B shape; past
    that, one slab a warp and the register table, whose 32 KB of shared memory then buys more CTAs an
    SM. The kernel is latency-bound at these sizes (Nsight Compute: 1.8 eligible warps a scheduler, 45 %
    of issue slots idle), so K is split until every SM holds about 24 warps for one 8-row tile, 12 for
    more (their warps carry more MMAs, and each K-range stores and re-reads 8M bytes of fp32 sums a
    weight row), with no range under 8 blocks and no more than 8 ranges (the most the sweeps tried) or
    K / 16M."""
    tiles = math.ceil(min(m, MAX_TILE_ROWS) / 8)
    warps = 8 if tiles == 1 else 4
    wide = tiles > 4
    slabs = 2 if (n // SLAB) % 2 == 0 and not wide else 1
    warps_per_sm = 24 if tiles == 1 else 12
    fill = warps_per_sm * _multiprocessors() // (n // SLAB // slabs)
    split = max(1, min(fill, 8, k // BLOCK // 8, k // (16 * min(m, MAX_TILE_ROWS))))
    return NF4Config(warps=warps, slabs=slabs, group=1, stages=3, split_k=split, smem_table=not wide)


@cache
def _multiprocessors() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _module(tiles: int, config: NF4Config, half: bool, partial: bool):
    """The compiled module for a launch shape; the K split is a launch argument, not compiled in."""
    return _compile(tiles, config.warps, config.slabs, config.group, config.stages, config.smem_table, half, partial)


@cache
def _compile(tiles: int, warps: int, slabs: int, group: int, stages: int, smem_table: bool, half: bool,
             partial: bool):
    """NVRTC, about a second, once per process and shape."""
    from torch.cuda._utils import _cuda_load_module, _nvrtc_compile

    defines = (f"#define MT {tiles}\n#define SLABS {slabs}\n#define WARPS {warps}\n#define G {group}\n"
               f"#define STAGES {stages}\n#define TABLE {int(smem_table)}\n#define F16 {int(half)}\n"
               f"#define PARTIAL {int(partial)}\n")
    cubin, _ = _nvrtc_compile(defines + SOURCE, "nf4_matmul")
    module = _cuda_load_module(cubin)
    module.nf4_matmul.set_shared_memory_config(_shared_bytes(tiles, NF4Config(warps, slabs, group, stages, 1,
                                                                              smem_table)))
    return module


def _shared_bytes(tiles: int, config: NF4Config) -> int:
    """The shared-memory ring (nf4_matmul.cu): a stage is x [8 rows a tile, 64 columns a block + 8 of padding]
    in 2 bytes, and 16 bytes of codes and 4 of scales per lane per (block, slab); then the decode table,
    256 pairs in 32 copies, if it lives there."""
    stage = 8 * tiles * (64 * config.group + 8) * 2 + config.warps * 32 * config.group * config.slabs * 20
    return config.stages * stage + (256 * 32 * 4 if config.smem_table else 0)


def _check(x: torch.Tensor, packed: PackedNF4) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the NF4 kernel takes bf16 or fp16 rows, not {x.dtype}")
    if x.shape[-1] != packed.k or x.stride(-1) != 1 or x.stride(0) % 8 or x.data_ptr() % 16:
        raise ValueError(f"x must be [M, {packed.k}] with 16-byte aligned rows, got {tuple(x.shape)}")


def nf4_matmul(x: torch.Tensor, packed: PackedNF4, config: NF4Config | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequant(packed)^T -> out [M, N] (allocated unless given); see the module docstring."""
    _check(x, packed)
    m, n, k = x.shape[0], packed.n, packed.k
    config = config or default_config(m, n, k)
    if (n // SLAB) % config.slabs:
        raise ValueError(f"{config.slabs} slabs a warp do not divide {n // SLAB} slabs")
    tiles = math.ceil(min(m, MAX_TILE_ROWS) / 8)
    blocks = k // BLOCK
    split = max(1, min(config.split_k, blocks))
    per_split = math.ceil(blocks / split)
    split = math.ceil(blocks / per_split)              # no empty K-range
    half = x.dtype == torch.float16
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    module = _module(tiles, config, half, split > 1)
    grid = (math.ceil(n // SLAB / (config.warps * config.slabs)), split, math.ceil(m / MAX_TILE_ROWS))
    module.nf4_matmul(grid=grid, block=(32 * config.warps, 1, 1), shared_mem=_shared_bytes(tiles, config),
                      args=[packed.words, packed.scales, x, target, m, n, k, x.stride(0), per_split, packed.shift,
                            *packed.table])
    if split > 1:
        total = m * n
        module.nf4_sum_splits(grid=(math.ceil(total / 256), 1, 1), block=(256, 1, 1),
                              args=[target, out, total, split, packed.shift])
    return out


def nf4_dequantize(packed: PackedNF4, dtype: torch.dtype) -> torch.Tensor:
    """The dense [N, K] weight the kernel multiplies by, rounded once to `dtype` (for prefill's cuBLAS)."""
    w = torch.empty(packed.n, packed.k, dtype=dtype, device=packed.words.device)
    module = _module(1, NF4Config(4, 1, 1, 2, 1), dtype == torch.float16, False)
    words = packed.n * packed.k // 8
    module.nf4_dequantize(grid=(math.ceil(words / 256), 1, 1), block=(256, 1, 1),
                          args=[packed.words, packed.scales, w, packed.n, packed.k, packed.shift, *packed.table])
    return w
