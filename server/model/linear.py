"""Frozen base weights: dense, or NF4 through bitsandbytes (and our own Triton kernel on CUDA).

A base linear may hold several weights that read the same input (q|k|v, gate|up) and returns their
outputs side by side, so one launch streams all of them (gpt-fast fuses wqkv the same way). Under
NF4 each weight keeps its own double-quantized block scales, exactly as it was quantized alone:
QLoRA adapters were trained against those per-weight values (adapters.formats.nf4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.formats import nf4


class BaseLinear(nn.Module):
    out_features: int                 # the sum of `splits`
    in_features: int
    splits: tuple[int, ...]           # out_features of each weight, in output order


class DenseLinear(BaseLinear):
    def __init__(self, weights: list[torch.Tensor]):
        super().__init__()
        self.splits = tuple(w.shape[0] for w in weights)
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)   # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# Below this many rows bitsandbytes is as fast or faster than our kernel on one weight alone on the H200
# (its GEMV at one row, dequantize + cuBLAS at two), while one launch of ours over several weights
# beats one of its launches per weight from a single row (tests/bench/kernel_bench.py, BENCHMARKS.md).
KERNEL_MIN_ROWS = 4
FUSED_KERNEL_MIN_ROWS = 1


class NF4Linear(BaseLinear):
    def __init__(self, weights: list[torch.Tensor], compute_dtype: torch.dtype, kernel_max_rows: int = 0):
        """kernel_max_rows: from KERNEL_MIN_ROWS up to this many rows (decode batches)
        server.kernels.nf4_matmul streams the packed weights once, all of them in one launch (CUDA
        only); above it (prefill) bitsandbytes dequantizes each to the compute dtype and cuBLAS runs,
        which wins once the matmul is compute-bound. 0: bitsandbytes always."""
        super().__init__()
        import bitsandbytes as bnb

        self._matmul = bnb.matmul_4bit
        self.splits = tuple(w.shape[0] for w in weights)
        self.out_features, self.in_features = sum(self.splits), weights[0].shape[1]
        quantized = [nf4.quantize(w, compute_dtype) for w in weights]
        # One buffer for all the packed weights (bnb's row-major packing concatenates along out
        # features), read by bitsandbytes a weight at a time through views.
        self.register_buffer("packed", torch.cat([packed for packed, _ in quantized]))   # [out * in / 2, 1] uint8
        self.quant_states = [state for _, state in quantized]
        self._kernel, self._kernel_max_rows = None, kernel_max_rows
        self._kernel_min_rows = FUSED_KERNEL_MIN_ROWS if len(weights) > 1 else KERNEL_MIN_ROWS
        if kernel_max_rows > 0:
            from ..kernels.nf4_matmul import decode_absmax, nf4_matmul

            self._kernel = nf4_matmul
            # [out * in / 64] float32, exact; the weights' scales side by side like their bytes
            self.absmax = torch.cat([decode_absmax(state) for state in self.quant_states])
            self.code = self.quant_states[0].code.float().contiguous()  # [16], bnb's one NF4 table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._kernel is not None and self._kernel_min_rows <= rows <= self._kernel_max_rows:
            out = self._kernel(x.reshape(rows, self.in_features), self.packed.view(-1), self.absmax, self.code,
                               self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        # For a single token bitsandbytes takes its 4-bit GEMV kernel; for more rows it
        # dequantizes to the compute dtype and runs a dense GEMM.
        parts = self.packed.split([n * self.in_features // 2 for n in self.splits])
        outs = [self._matmul(x, packed.t(), quant_state=state) for packed, state in zip(parts, self.quant_states)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
