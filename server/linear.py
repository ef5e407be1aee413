"""Frozen base weights: dense, or NF4 through bitsandbytes.

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


class NF4Linear(BaseLinear):
    def __init__(self, weight: torch.Tensor, compute_dtype: torch.dtype):
        super().__init__()
        import bitsandbytes as bnb

        self._matmul = bnb.matmul_4bit
        self.out_features, self.in_features = weight.shape
        packed, self.quant_state = nf4.quantize(weight, compute_dtype)
        self.register_buffer("packed", packed)                      # [out * in / 2, 1] uint8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # For a single token bitsandbytes takes its 4-bit GEMV kernel; for more rows it
        # dequantizes to the compute dtype and runs a dense GEMM.
        return self._matmul(x, self.packed.t(), quant_state=self.quant_state)

