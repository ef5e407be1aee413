"""The key/value cache, paged: one pool of fixed-size blocks per layer, reserved at start-up.

A request's tokens live in the blocks its block table lists (server/engine/block_pool.py): token i
sits in block table[i // block_size] at offset i % block_size. Memory then follows the tokens really
in flight, not slots × the longest possible request (vLLM's PagedAttention). Block 0 is never handed
to a request: CUDA-graph padding rows write their dummy token there.
"""
from __future__ import annotations

import torch

from ..host_memory import lazy_zeros


class PagedKVCache:
    def __init__(self, n_layers: int, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (num_blocks, block_size, n_kv_heads, head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]
        self.v = [lazy_zeros(shape, dtype, device) for _ in range(n_layers)]

    @staticmethod
    def bytes_per_block(n_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * block_size * n_kv_heads * head_dim * dtype.itemsize

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [N, KV, D] of N tokens into cache slots [N] (block · block_size + offset)."""
        kv_heads, head_dim = k.shape[1:]
        self.k[layer].view(-1, kv_heads, head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, kv_heads, head_dim).index_copy_(0, slots, v)

    def gather(self, layer: int, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """blocks [..., nb] -> the keys and values of those blocks' tokens in order, [..., nb · block_size, KV, D]."""
        # index_select over the flattened table, not cache[blocks]: on the CPU advanced indexing took 3-4x as
        # long for 8 rows, twice a layer.
        shape = (*blocks.shape[:-1], blocks.shape[-1] * self.block_size, *self.k[layer].shape[2:])
        flat = blocks.reshape(-1)
        return self.k[layer].index_select(0, flat).view(shape), self.v[layer].index_select(0, flat).view(shape)

    def copy_block(self, src: int, dst: int) -> None:
        """Every layer's block `src` into block `dst` (copy-on-write of a forked request's last block)."""
        for cache in (*self.k, *self.v):
            cache[dst].copy_(cache[src])
