"""A Llama-family decoder with an explicit KV cache and a batched LoRA delta on every projection.

Plain modules in the order a token meets them (gpt-fast is the model): RMSNorm, Attention with
RoPE and grouped-query heads, SwiGLU FeedForward. Nothing here decides who runs: the runner hands
in a `Batch` that says which cache slot, position and adapter each row has.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import KVCache
from .linear import BaseLinear
from .lora_batch import LoraBatch, LoraStack


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
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where row b may attend cache position l (decode only)
    lora: LoraBatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as transformers does; bf16 here drifts visibly from the reference.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Projection(nn.Module):
    """A frozen base weight (dense or NF4) plus this layer's slice of every resident adapter."""

    def __init__(self, base: BaseLinear, lora: LoraStack):
        super().__init__()
        self.base = base
        self.lora = lora

    def forward(self, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        return self.lora.add_delta(self.base(x), x, batch)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, q: Projection, k: Projection, v: Projection, o: Projection):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q, k, v, o

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        q = self.q_proj(x, batch.lora).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.k_proj(x, batch.lora).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x, batch.lora).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
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
        return self.o_proj(out, batch.lora)


class FeedForward(nn.Module):
    def __init__(self, gate: Projection, up: Projection, down: Projection):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate, up, down

    def forward(self, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x, lora)) * self.up_proj(x, lora), lora)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention: Attention, feed_forward: FeedForward):
        super().__init__()
        self.attention, self.feed_forward = attention, feed_forward
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, batch: Batch, cache: KVCache, layer: int) -> torch.Tensor:
        h = x + self.attention(self.input_layernorm(x), batch, cache, layer)
        return h + self.feed_forward(self.post_attention_layernorm(h), batch.lora)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, embed_tokens: nn.Embedding, layers: list[TransformerBlock],
                 lm_head: BaseLinear, inv_freq: torch.Tensor, rope_scaling: float):
        super().__init__()
        self.args = args
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.dim, args.norm_eps)
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
        mask = torch.arange(context, device=positions.device)[None, :] <= positions[:, None]   # [B, L]
        return Batch(prefill=False, slots=torch.arange(rows, device=positions.device), positions=positions[:, None],
                     cos=self.rope_cos[positions[:, None]], sin=self.rope_sin[positions[:, None]],
                     decode_mask=mask[:, None, None, :], lora=lora)

    def forward(self, tokens: torch.Tensor, batch: Batch, cache: KVCache,
                last_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, vocab] of each row's token at `last_index` (default: the last)."""
        x = self.embed_tokens(tokens)                                  # [B, T, dim]
        for i, layer in enumerate(self.layers):
            x = layer(x, batch, cache, i)
        if last_index is None:
            x = x[:, -1]
        else:
            # Only each row's last real token needs logits: skips the vocab matmul for the rest.
            x = x[torch.arange(x.shape[0], device=x.device), last_index]
        return self.lm_head(self.norm(x)).float()
