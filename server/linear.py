"""Frozen base weights: dense, or NF4 through bitsandbytes (and our own Triton kernel on CUDA).

q, k, v (and gate, up) stay separate matrices rather than fused as gpt-fast does: under NF4 with
double quantization each weight's block scales are themselves quantized per weight, and QLoRA
adapters were trained against exactly those per-weight values (adapters.formats.nf4).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.formats import nf4


class BaseLinear(nn.Module):
    out_features: int
    in_features: int


class DenseLinear(BaseLinear):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight, requires_grad=False)   # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


# Below this many rows bitsandbytes is as fast or faster than our kernel on the H200 (its GEMV at one
# row, dequantize + cuBLAS at two: tests/bench/kernel_bench.py, BENCHMARKS.md).
KERNEL_MIN_ROWS = 4


class NF4Linear(BaseLinear):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype, kernel_max_rows: int = 0):
        """kernel_max_rows: from KERNEL_MIN_ROWS up to this many rows (decode batches)
        server.kernels.nf4_matmul streams the packed weight once (CUDA only); above it (prefill)
        bitsandbytes dequantizes to the compute dtype and cuBLAS runs, which wins once the matmul is
        compute-bound. 0: bitsandbytes always."""
        super().__init__()
        import bitsandbytes as bnb

        self._matmul = bnb.matmul_4bit
        self.out_features, self.in_features = weight.shape
        packed, self.quant_state = nf4.quantize(weight, compute_dtype)
        self.register_buffer("packed", packed)                      # [out * in / 2, 1] uint8
        self._kernel, self._kernel_max_rows = None, kernel_max_rows
        if kernel_max_rows > 0:
            from .kernels.nf4_matmul import decode_absmax, nf4_matmul

            self._kernel = nf4_matmul
            self.absmax = decode_absmax(self.quant_state)           # [out * in / 64] float32, exact
            self.code = self.quant_state.code.float().contiguous()  # [16]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self._kernel is not None and KERNEL_MIN_ROWS <= rows <= self._kernel_max_rows:
            out = self._kernel(x.reshape(rows, self.in_features), self.packed.view(-1), self.absmax, self.code,
                               self.out_features)
            return out.view(*x.shape[:-1], self.out_features)
        # For a single token bitsandbytes takes its 4-bit GEMV kernel; for more rows it
        # dequantizes to the compute dtype and runs a dense GEMM.
        return self._matmul(x, self.packed.t(), quant_state=self.quant_state)

