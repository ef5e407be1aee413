"""The one definition of how a base weight becomes NF4, shared by serving, QLoRA training and merging.

QLoRA adapters are trained against the quantized base, so the server must quantize it the same
way, bit for bit: cast to the compute dtype first, then bitsandbytes NF4 with 64-wide blocks and
double quantization of the block scales (Dettmers et al. 2023). This is exactly what transformers
does under `bnb_config()`; a test holds the two together.
"""
from __future__ import annotations

import torch

BLOCK_SIZE = 64


def bnb_config(compute_dtype: torch.dtype = torch.bfloat16):
    """transformers' BitsAndBytesConfig for this quantization (for the trainer and the merge tool)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def quantize(weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16):
    """[out, in] weight -> (packed uint8 tensor, bitsandbytes QuantState), on the weight's device."""
    import bitsandbytes.functional as bnbf

    return bnbf.quantize_4bit(weight.to(compute_dtype).contiguous(), blocksize=BLOCK_SIZE,
                              compress_statistics=True, quant_type="nf4")


def dequantize(packed: torch.Tensor, state) -> torch.Tensor:
    """The dense [out, in] weight the quantized one stands for, in the compute dtype."""
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state)


def round_trip(weight: torch.Tensor, compute_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The weight as the server sees it after NF4: what QLoRA adapters were trained against."""
    return dequantize(*quantize(weight, compute_dtype))
