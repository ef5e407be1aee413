"""A Llama-family decoder with an explicit KV cache and a batched LoRA delta on every projection.

Plain modules in the order a token meets them (gpt-fast is the model): RMSNorm, Attention with
RoPE and grouped-query heads, SwiGLU FeedForward. Nothing here decides who runs: the runner hands
in a `Batch` that says which cache slot, position and adapter each row has.

With `kernels` (CUDA) the steps torch spells as many small launches run as one Triton kernel each
(server/kernels): residual add + RMSNorm, and for decode rows RoPE + KV-cache write and attention
over the cache. The torch code beside them is the CPU path and the reference they are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
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


@dataclass(slots=True)
class Batch:
    """Per-step inputs besides the tokens, built once by the runner and read by every layer.

    Prefill rows hold whole prompts, right-padded, starting at position 0. Decode rows hold one
    token each and are the cache slots 0..B-1 themselves, so attention reads the cache in place."""
    prefill: bool
    slots: torch.Tensor          # [B] cache slot of each row
    positions: torch.Tensor      # [B, T] position of each token
    cos: torch.Tensor            # [B, T, head_dim] rotary tables gathered at `positions`
    sin: torch.Tensor            # [B, T, head_dim]
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where row b may attend cache position l (torch decode only)
    lora: LoraBatch


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
            from ..kernels.rope_cache import rope_and_cache_write

            self._kernels = (rope_and_cache_write, decode_attention)

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q, k, v = self.qkv_proj(x, batch.lora)                         # [B, T, H*D], [B, T, KV*D] x 2
        if self._kernels is not None and not batch.prefill:
            rope_and_cache_write, decode_attention = self._kernels
            positions = batch.positions[:, 0]
            q = rope_and_cache_write(q[:, 0], k[:, 0], v[:, 0], positions, batch.cos[:, 0], batch.sin[:, 0],
                                     cache.k[layer], cache.v[layer])    # [B, H, D]
            out = decode_attention(q, cache.k[layer], cache.v[layer], positions)
            (y,) = self.o_proj(out.view(bsz, 1, self.n_heads * self.head_dim), batch.lora)
            return y
        q = q.view(bsz, seqlen, self.n_heads, self.head_dim)
        k = k.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        cos, sin = batch.cos.unsqueeze(2), batch.sin.unsqueeze(2)     # [B, T, 1, D]
        q = (q * cos + rotate_half(q) * sin).transpose(1, 2)           # [B, H, T, D]
        k = (k * cos + rotate_half(k) * sin).transpose(1, 2)           # [B, KV, T, D]
        v = v.transpose(1, 2)                                          # [B, KV, T, D]
        if batch.prefill:
            cache.write_prefill(layer, batch.slots, k, v)
            # Right padding with a causal mask is exact: a real token never sees a later (pad) one.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            cache.write_decode(layer, batch.positions[:, 0], k, v)
            keys, values = cache.read_decode(layer, bsz, batch.decode_mask.shape[-1])  # [B, KV, L, D]
            # Grouped-query decode without copying K/V per head: the G query heads that share a
            # KV head form the rows of one small matmul. Plain matmuls rather than SDPA: one query
            # token is memory-bound either way, and fused kernels reject a strided cache view
            # with a broadcast mask on some backends.
            group = self.n_heads // self.n_kv_heads
            q = q.view(bsz, self.n_kv_heads, group, self.head_dim)
            scores = (q @ keys.transpose(-1, -2)).float() * self.head_dim ** -0.5     # [B, KV, G, L]
            scores = scores.masked_fill(~batch.decode_mask, float("-inf"))
            out = (scores.softmax(-1).to(values.dtype) @ values).view(bsz, self.n_heads, 1, self.head_dim)
        out = out.transpose(1, 2).reshape(bsz, seqlen, self.n_heads * self.head_dim)
        (y,) = self.o_proj(out, batch.lora)
        return y


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

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, batch: Batch, cache: KVCache,
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

    def decode_batch(self, positions: torch.Tensor, context: int, lora: LoraBatch) -> Batch:
        """The Batch of a decode step: row b is cache slot b, its new token at positions[b],
        attending to cache positions 0..positions[b] of a `context`-long window."""
        rows = positions.shape[0]
        mask = None
        if not self.kernels:
            mask = (torch.arange(context, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
        return Batch(prefill=False, slots=torch.arange(rows, device=positions.device), positions=positions[:, None],
                     cos=self.rope_cos[positions[:, None]], sin=self.rope_sin[positions[:, None]],
                     decode_mask=mask, lora=lora)

    def forward(self, tokens: torch.Tensor, batch: Batch, cache: KVCache,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, vocab] of each row's token at `last_index` (default: the last)."""
        x, delta = self.residual(tokens, batch, cache)
        if last_index is None:
            x, delta = x[:, -1], delta[:, -1]
        else:
            # Only each row's last real token needs logits: skips the vocab matmul for the rest.
            rows = torch.arange(x.shape[0], device=x.device)
            x, delta = x[rows, last_index], delta[rows, last_index]
        return self.logits(x, delta)

    def residual(self, tokens: torch.Tensor, batch: Batch, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [B, T] -> the residual stream and the last block's output [B, T, dim] each, not yet added."""
        x, delta = self.embed_tokens(tokens), None                     # [B, T, dim]
        for i, layer in enumerate(self.layers):
            x, delta = layer(x, delta, batch, cache, i)
        return x, delta

    def logits(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """residual(...)'s two [..., dim] at the positions wanted -> logits [..., vocab] float32."""
        return self.lm_head(self.norm(x, delta)[0]).float()
