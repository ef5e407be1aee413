"""Frozen base weights: dense, or NF4 through bitsandbytes (and our own CUDA kernel on CUDA).

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
        """On the CPU the weights are reordered once into oneDNN's blocked layout where it takes their dtype
        (float32 everywhere; bfloat16 needs AVX512 or AVX-NE-CONVERT), and only that copy is kept: decoding
        streams every weight each step, and oneDNN's prepacked GEMM read them 1.5x faster than F.linear's
        BLAS at 1 to 8 rows (2-3x for the vocabulary matmul) on a 2-core AVX2 host, and no slower at prefill.
        The sums are float32 in another order: within 1e-5 relative of F.linear. A tied lm_head keeps its
        own prepacked copy beside the embedding table (113 MB for the default model): it is the largest
        matmul of a decode step, 2-3x faster so."""
        super().__init__()
        self.splits = tuple(w.shape[0] for w in weights)
        weight = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.out_features, self.in_features = weight.shape
        self.prepacked = _onednn_prepacked(weight)
        if self.prepacked is None:
            self.weight = nn.Parameter(weight, requires_grad=False)   # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prepacked is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.prepacked, None, "none", [], "")
        return F.linear(x, self.weight)


def _onednn_prepacked(weight: torch.Tensor) -> torch.Tensor | None:
    """weight [out, in] in oneDNN's layout for x · weightᵀ (an opaque mkldnn tensor), or None where
    this device, build or CPU cannot take it. The batch size is left to oneDNN: hints of 1, 8 and 32
    rows measured the same."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except RuntimeError:      # the CPU lacks the instructions this dtype needs
        return None


class NF4Linear(BaseLinear):
    def __init__(self, weights: list[torch.Tensor], compute_dtype: torch.dtype, kernel_max_rows: int = 0):
        """kernel_max_rows > 0 (CUDA): up to this many rows (decode batches) server.kernels.nf4_matmul
        streams all the weights in one launch; above it (prefill) the same codes are dequantized to the
        compute dtype and cuBLAS runs, which wins once the matmul is compute-bound. The weights are then
        held only in the kernel's layout. 0, or a shape the layout does not take: bitsandbytes always."""
        super().__init__()
        self.splits = tuple(w.shape[0] for w in weights)
        self.out_features, self.in_features = sum(self.splits), weights[0].shape[1]
        quantized = [nf4.quantize(w, compute_dtype) for w in weights]
        packed = torch.cat([packed for packed, _ in quantized])        # [out * in / 2, 1] uint8, bnb's row-major
        self._compute_dtype, self._kernel_max_rows = compute_dtype, kernel_max_rows
        from ..kernels.nf4_layout import fits

        if kernel_max_rows > 0 and fits(self.out_features, self.in_features):
            from ..kernels.nf4_layout import decode_absmax, repack

            # Each weight keeps its own double-quantized scales, side by side like their bytes.
            absmax = torch.cat([decode_absmax(state) for _, state in quantized])
            self.kernel_weight = repack(packed.view(-1), absmax, quantized[0][1].code, self.out_features,
                                        self.in_features, compute_dtype)
            # registered so that they count as the model's device bytes (weights.base_weight_bytes)
            self.register_buffer("kernel_words", self.kernel_weight.words)
            self.register_buffer("kernel_scales", self.kernel_weight.scales)
            self.quant_states = ()
        else:
            import bitsandbytes as bnb

            self._matmul = bnb.matmul_4bit
            self.kernel_weight = None
            self.register_buffer("packed", packed)
            self.quant_states = [state for _, state in quantized]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_weight is not None:
            from ..kernels.nf4_matmul import nf4_dequantize, nf4_matmul

            rows = x.numel() // self.in_features
            flat = x.reshape(rows, self.in_features)
            if rows <= self._kernel_max_rows:
                out = nf4_matmul(flat, self.kernel_weight)
            else:
                out = F.linear(flat, nf4_dequantize(self.kernel_weight, self._compute_dtype))
            return out.view(*x.shape[:-1], self.out_features)
        # For a single token bitsandbytes takes its 4-bit GEMV kernel; for more rows it
        # dequantizes to the compute dtype and runs a dense GEMM.
        parts = self.packed.split([n * self.in_features // 2 for n in self.splits])
        outs = [self._matmul(x, packed.t(), quant_state=state) for packed, state in zip(parts, self.quant_states)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
