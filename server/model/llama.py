"""A Llama-family decoder with an explicit KV cache and a batched LoRA delta on every projection.

Plain modules in the order a token meets them (gpt-fast is the model): RMSNorm, Attention with
RoPE and grouped-query heads, SwiGLU FeedForward. Nothing here decides who runs: the runner hands
in a `Batch` that says which position, cache blocks and adapter each token row has.

With `kernels` (CUDA) the steps torch spells as many small launches run as one Triton kernel each
(server/kernels): residual add + RMSNorm, RoPE + KV-cache write, and attention over the paged cache,
one launch for the decode rows and one for every prompt chunk of the pass. The torch code beside them is
the CPU path and the reference they are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import PagedKVCache
from .linear import BaseLinear
from ..lora.batch import LoraBatch, LoraGroup


@dataclass(frozen=True, slots=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config) -> "ModelArgs":
        """From a transformers LlamaConfig."""
        return cls(vocab_size=config.vocab_size, dim=config.hidden_size, n_layers=config.num_hidden_layers,
                   n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
                   head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                   intermediate_size=config.intermediate_size, norm_eps=config.rms_norm_eps,
                   max_position_embeddings=config.max_position_embeddings,
                   tie_word_embeddings=bool(config.tie_word_embeddings))


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of one request's prompt tokens in a pass: rows [row, row + length) at positions start.., which
    attend to that request's earlier tokens in the cache and causally to each other."""
    row: int
    length: int
    start: int
    blocks: torch.Tensor         # [nb] the request's blocks holding positions 0..start + length - 1


@dataclass(slots=True)
class Batch:
    """Per-pass inputs besides the tokens, built once by the runner and read by every layer.

    Every row is one token (tokens [N, 1]), so prefill chunks and decode rows share one pass. The first
    `num_decode` rows are single tokens that attend through their block tables (decode attention); each
    prefill chunk follows as its own run of rows."""
    positions: torch.Tensor      # [N] position of each token
    slots: torch.Tensor          # [N] cache slot each token's keys and values go to (block · block size + offset)
    cos: torch.Tensor            # [N, 1, head_dim] rotary tables gathered at `positions`
    sin: torch.Tensor            # [N, 1, head_dim]
    block_tables: torch.Tensor   # [R, nb] int32 blocks of the decode rows (R ≥ num_decode)
    num_decode: int
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, nb · block size] True where a decode row may attend (torch)
    chunks: tuple[Chunk, ...]
    lora: LoraBatch
    # The chunks as the prefill kernel takes them (kernels only): each one's blocks [C, nb] int32 and
    # (first row after the decode rows, length, start) [C, 3] int32.
    chunk_tables: torch.Tensor | None = None
    chunk_rows: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Adds the previous sub-layer's output to the residual stream, then normalises it."""

    def __init__(self, dim: int, eps: float, kernels: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self._kernel = None
        if kernels:
            from ..kernels.rms_norm import add_rms_norm

            self._kernel = add_rms_norm

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x, delta [..., dim] -> (normalised x + delta, x + delta): the next input and the new residual."""
        if self._kernel is not None:
            return self._kernel(x, delta, self.weight, self.eps)
        h = x if delta is None else x + delta
        # Normalise in float32 as transformers does; bf16 here drifts visibly from the reference.
        h32 = h.float()
        h32 = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h32.to(h.dtype), h


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Projections(nn.Module):
    """Frozen base weights that read the same input (q|k|v, gate|up, or one alone), in one matmul,
    each plus its own slice of every resident adapter."""

    def __init__(self, base: BaseLinear, lora: LoraGroup):
        super().__init__()
        self.base = base
        self.lora = lora

    def forward(self, x: torch.Tensor, batch: LoraBatch) -> list[torch.Tensor]:
        """x [B, T, in] -> one [B, T, out_i] per weight, in order."""
        return self.lora.add_delta(self.base(x), x, batch)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, qkv: Projections, o: Projections, kernels: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.qkv_proj, self.o_proj = qkv, o
        self._kernels = None
        if kernels:
            from ..kernels.decode_attention import decode_attention
            from ..kernels.prefill_attention import prefill_attention
            from ..kernels.rope_cache import rope_and_cache_write

            self._kernels = (rope_and_cache_write, decode_attention, prefill_attention)

    def forward(self, x: torch.Tensor, batch: Batch, cache: PagedKVCache, layer: int) -> torch.Tensor:
        rows = x.shape[0]                                              # x [N, 1, dim]: one token a row
        q, k, v = self.qkv_proj(x, batch.lora)                         # [N, 1, H*D], [N, 1, KV*D] x 2
        if self._kernels is not None:
            rope_and_cache_write, decode_attention, prefill_attention = self._kernels
            q = rope_and_cache_write(q[:, 0], k[:, 0], v[:, 0], batch.slots, batch.cos[:, 0], batch.sin[:, 0],
                                     cache.k[layer], cache.v[layer])    # [N, H, D]
        else:
            cos, sin = batch.cos, batch.sin                            # [N, 1, D]: broadcast over heads
            q = q.view(rows, self.n_heads, self.head_dim)
            k = k.view(rows, self.n_kv_heads, self.head_dim)
            q = q * cos + rotate_half(q) * sin
            cache.write(layer, batch.slots, k * cos + rotate_half(k) * sin, v.view(rows, self.n_kv_heads, self.head_dim))
        decode = batch.num_decode
        parts = []
        if decode:
            if self._kernels is not None:
                parts.append(decode_attention(q[:decode], cache.k[layer], cache.v[layer], batch.block_tables,
                                              batch.positions[:decode]))
            else:
                parts.append(self._decode_torch(q[:decode], batch, cache, layer))
        if batch.chunks and self._kernels is not None:
            parts.append(prefill_attention(q[decode:], cache.k[layer], cache.v[layer], batch.chunk_tables,
                                           batch.chunk_rows, max(c.length for c in batch.chunks)))
        else:
            parts.extend(self._chunk(q[c.row:c.row + c.length], c, cache, layer) for c in batch.chunks)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)         # [N, H, D]
        (y,) = self.o_proj(out.view(rows, 1, self.n_heads * self.head_dim), batch.lora)
        return y

    def _decode_torch(self, q: torch.Tensor, batch: Batch, cache: PagedKVCache, layer: int) -> torch.Tensor:
        """q [B, H, D] of single-token rows -> [B, H, D], each attending to its own tokens through its blocks."""
        rows = q.shape[0]
        keys, values = cache.gather(layer, batch.block_tables[:rows])   # [B, L, KV, D]
        # Grouped-query decode without copying K/V per head: the G query heads that share a KV head form
        # the rows of one small matmul. Plain matmuls rather than SDPA: one query token is memory-bound
        # either way, and fused kernels reject a broadcast mask on some backends.
        group = self.n_heads // self.n_kv_heads
        q = q.view(rows, self.n_kv_heads, group, self.head_dim)
        scores = (q @ keys.permute(0, 2, 3, 1)).float() * self.head_dim ** -0.5       # [B, KV, G, L]
        scores = scores.masked_fill(~batch.decode_mask, float("-inf"))
        out = scores.softmax(-1).to(values.dtype) @ values.transpose(1, 2)             # [B, KV, G, D]
        return out.view(rows, self.n_heads, self.head_dim)

    def _chunk(self, q: torch.Tensor, chunk: Chunk, cache: PagedKVCache, layer: int) -> torch.Tensor:
        """q [T, H, D] of one request's prompt run -> [T, H, D]: causal over its cached tokens and itself."""
        end = chunk.start + chunk.length
        keys, values = cache.gather(layer, chunk.blocks)
        keys, values = keys[:end].transpose(0, 1), values[:end].transpose(0, 1)        # [KV, L, D]
        mask = None
        if chunk.start:
            positions = torch.arange(end, device=q.device)
            mask = positions[None, :] <= positions[chunk.start:, None]                # [T, L]
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask,
                                             is_causal=mask is None, enable_gqa=True)  # [1, H, T, D]
        return out[0].transpose(0, 1)


class FeedForward(nn.Module):
    def __init__(self, gate_up: Projections, down: Projections):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora)
        (y,) = self.down_proj(F.silu(gate) * up, lora)
        return y


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention: Attention, feed_forward: FeedForward, kernels: bool = False):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps, kernels)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps, kernels)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, batch: Batch, cache: PagedKVCache,
                layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream x plus the previous block's output delta -> (the new stream, this block's output):
        each block's last add is left to the next norm, which does it in the same pass."""
        y, x = self.input_layernorm(x, delta)
        y, x = self.post_attention_layernorm(x, self.attention(y, batch, cache, layer))
        return x, self.feed_forward(y, batch.lora)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, embed_tokens: nn.Embedding, layers: list[TransformerBlock],
                 lm_head: BaseLinear, inv_freq: torch.Tensor, rope_scaling: float, kernels: bool = False):
        super().__init__()
        self.args = args
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.dim, args.norm_eps, kernels)
        # Decode attention then reads each row's own length from its position: no mask, and one
        # context size serves every step (cuda_graphs captures no context buckets).
        self.kernels = kernels
        self.lm_head = lm_head
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device=inv_freq.device)
        freqs = torch.outer(positions, inv_freq.float())
        table = torch.cat((freqs, freqs), dim=-1)                     # [max_pos, head_dim]
        dtype = embed_tokens.weight.dtype
        self.register_buffer("rope_cos", (table.cos() * rope_scaling).to(dtype), persistent=False)
        self.register_buffer("rope_sin", (table.sin() * rope_scaling).to(dtype), persistent=False)

    def batch(self, positions: torch.Tensor, slots: torch.Tensor, block_tables: torch.Tensor, num_decode: int,
              chunks: tuple[Chunk, ...], lora: LoraBatch, block_size: int) -> Batch:
        """The Batch of a pass of N token rows (positions, slots [N]); the first `num_decode` are single tokens
        attending through `block_tables` [R, nb], the rest are `chunks`."""
        mask = None
        if num_decode and not self.kernels:
            context = torch.arange(block_tables.shape[1] * block_size, device=positions.device)
            mask = (context[None, :] <= positions[:num_decode, None])[:, None, None, :]
        chunk_tables = chunk_rows = None
        if chunks and self.kernels:
            chunk_tables = torch.nn.utils.rnn.pad_sequence([c.blocks for c in chunks], batch_first=True).int()
            chunk_rows = torch.tensor([(c.row - num_decode, c.length, c.start) for c in chunks], dtype=torch.int32,
                                      device=positions.device)
        index = positions[:, None]
        return Batch(positions, slots, self.rope_cos[index], self.rope_sin[index], block_tables, num_decode,
                     mask, chunks, lora, chunk_tables, chunk_rows)

    def forward(self, tokens: torch.Tensor, batch: Batch, cache: PagedKVCache,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [N, 1] -> logits [len(rows), vocab] of the token rows `rows` (default: every row)."""
        x, delta = self.residual(tokens, batch, cache)
        if rows is not None:
            # Only rows that sample need logits: skips the vocab matmul for the rest of a prompt.
            x, delta = x.index_select(0, rows), delta.index_select(0, rows)
        return self.logits(x, delta)

    def residual(self, tokens: torch.Tensor, batch: Batch, cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [N, 1] -> the residual stream and the last block's output [N, dim] each, not yet added."""
        x, delta = self.embed_tokens(tokens), None                     # [N, 1, dim]
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, batch, cache, i)
        return x[:, 0], delta[:, 0]

    def logits(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """residual(...)'s two [..., dim] at the positions wanted -> logits [..., vocab] float32."""
        return self.lm_head(self.norm(x, delta)[0]).float()
