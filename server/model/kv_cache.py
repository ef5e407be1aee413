"""The key/value cache: one contiguous [slots, kv_heads, max_seq, head_dim] buffer per layer.

A running request owns one slot for its whole life. The scheduler hands out the lowest free slot,
so decode can run on slots 0..B-1 and read the cache as a view, with no gather of K/V per step.
Memory is reserved once at start-up, so running out shows at start, not under load.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, num_slots: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_slots, n_kv_heads, max_seq_len, head_dim)
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write_prefill(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, KV, T, D] of whole prompts (positions 0..T-1) into `slots` [B]."""
        length = k.shape[2]
        self.k[layer][slots, :, :length] = k
        self.v[layer][slots, :, :length] = v

    def fork(self, source: int, targets: list[int], length: int) -> None:
        """Copies positions 0..length-1 of slot `source` into slots `targets`: choices of one request
        (n > 1) start from one prefill of their shared prompt."""
        index = torch.tensor(targets, device=self.k[0].device)
        for k, v in zip(self.k, self.v):
            k[index, :, :length] = k[source, :, :length]
            v[index, :, :length] = v[source, :, :length]

    def write_decode(self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, KV, 1, D] of one new token per slot 0..B-1, at `positions` [B]."""
        rows = torch.arange(k.shape[0], device=k.device)
        self.k[layer][rows, :, positions] = k[:, :, 0]
        self.v[layer][rows, :, positions] = v[:, :, 0]

    def read_decode(self, layer: int, num_rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [num_rows, KV, length, D] of slots 0..num_rows-1."""
        return self.k[layer][:num_rows, :, :length], self.v[layer][:num_rows, :, :length]
