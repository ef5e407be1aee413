"""Next tokens for a batch of rows, each with its own temperature, top-k, top-p and generator."""
from __future__ import annotations

import torch

from .sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [B, vocab] float32, one row per sequence -> one token id per sequence."""
    return sample_on_device(logits, seqs).tolist()


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """logits [B, vocab] float32, one row per sequence -> token ids [B] int64 on the logits' device,
    without waiting for them.

    Greedy rows take the argmax. Sampled rows draw by inverse CDF over their filtered, sorted
    distribution, with one uniform number from the row's own seeded generator: deterministic for
    a seed, and one device pass for the whole batch."""
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if not sampled_rows:
        return greedy
    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    params = [seqs[i].params for i in sampled_rows]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    top_k = torch.tensor([p.top_k or logits.shape[-1] for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    uniform = torch.tensor([seqs[i].rng.random() for i in sampled_rows], device=device)

    # Shifting the top logit to 0 before dividing keeps a tiny temperature from overflowing to inf (NaN probs).
    scaled = (logits[rows] - logits[rows].amax(dim=-1, keepdim=True)) / temperature[:, None]
    probs, order = torch.sort(torch.softmax(scaled, dim=-1), dim=-1, descending=True)
    cumulative = probs.cumsum(dim=-1)
    rank = torch.arange(probs.shape[-1], device=device)
    # Keep a token if it is within top-k and the mass before it is under top-p (the first always stays).
    keep = (rank[None, :] < top_k[:, None]) & ((cumulative - probs) < top_p[:, None])
    probs = probs * keep
    cumulative = probs.cumsum(dim=-1)
    threshold = uniform * cumulative[:, -1]
    picked = torch.searchsorted(cumulative, threshold[:, None]).clamp_(max=probs.shape[-1] - 1)
    tokens = greedy.clone()
    tokens[rows] = order.gather(1, picked).squeeze(1)
    return tokens
