"""Zero-filled tensors whose pages the host maps only when first written."""
from __future__ import annotations

import numpy as np
import torch

# numpy has no bf16: zeros of the same width, viewed as the dtype (all-zero bits are 0.0 in every float).
_SAME_WIDTH = {torch.float32: np.float32, torch.bfloat16: np.uint16, torch.float16: np.uint16}


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros, but on the CPU from calloc: the OS hands out zero pages as they are touched, so a
    KV cache or LoRA stack sized for the worst case costs no time and no resident memory until used
    (torch.zeros writes every byte: about a second and 2.6 GB at each start of the default server)."""
    if torch.device(device).type != "cpu" or dtype not in _SAME_WIDTH:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.zeros(shape, dtype=_SAME_WIDTH[dtype])).view(dtype)
