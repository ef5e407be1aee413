"""Next tokens for a batch of rows, each with its own temperature, top-k, top-p and generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .grammar import apply_masks
from .penalties import Penalties
from .sequence import Sequence, TokenLogprob


@dataclass(slots=True)
class Logprobs:
    """The log-probabilities of the rows that asked for them, still on the device."""
    rows: list[int]                 # indices into the pass's sequences
    chosen: torch.Tensor            # [r] the sampled token's
    top: torch.Tensor               # [r, k] the k most likely tokens' (k: the most any row asked for)
    top_ids: torch.Tensor           # [r, k]

    def to_host(self, seqs: list[Sequence], tokens: list[int]) -> dict[int, TokenLogprob]:
        """Row index -> the row's TokenLogprob; alternatives a grammar forbids (-inf) are left out."""
        chosen, top, top_ids = self.chosen.tolist(), self.top.tolist(), self.top_ids.tolist()
        out = {}
        for j, row in enumerate(self.rows):
            n, text = seqs[row].params.logprobs, seqs[row].text.token_text
            alternatives = tuple((t, text(t), lp) for t, lp in zip(top_ids[j][:n], top[j][:n]) if lp != float("-inf"))
            out[row] = TokenLogprob(tokens[row], text(tokens[row]), chosen[j], alternatives)
        return out


def sample_on_device(logits: torch.Tensor, seqs: list[Sequence],
                     penalties: Penalties | None = None) -> tuple[torch.Tensor, Logprobs | None]:
    """logits [B, vocab] float32, one row per sequence -> token ids [B] int64 on the logits' device,
    without waiting for them, and the logprobs of the rows that asked for them (params.logprobs set).

    A row's logit bias and penalties are applied first (penalties.py, which then counts the sampled
    tokens), then a row with a grammar has the tokens its grammar forbids masked to -inf; other rows'
    logits are not touched. Greedy rows take the argmax. Sampled rows draw by inverse CDF over their
    filtered, sorted distribution, with one uniform number from the row's own seeded generator:
    deterministic for a seed, and one device pass for the whole batch.

    Logprobs are the log-softmax of the logits this function saw after bias, penalties, the grammar
    mask and the row's temperature, before top-k / top-p truncation; greedy rows (temperature 0) use
    the logits without a temperature."""
    if penalties is not None:
        logits = penalties.apply(logits, seqs)
    logits = apply_masks(logits, seqs)
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
    if sampled_rows:
        tokens = _draw(logits, seqs, sampled_rows, tokens)
    if penalties is not None:
        penalties.record(seqs, tokens)
    return tokens, _logprobs(logits, seqs, tokens)


def _draw(logits: torch.Tensor, seqs: list[Sequence], sampled_rows: list[int], greedy: torch.Tensor) -> torch.Tensor:
    """The greedy tokens [B] with the sampled rows' drawn instead."""
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


def _logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: torch.Tensor) -> Logprobs | None:
    rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    if not rows:
        return None
    index = torch.tensor(rows, device=logits.device)
    temperature = torch.tensor([seqs[i].params.temperature or 1.0 for i in rows], device=logits.device)
    logprobs = torch.log_softmax(logits[index].float() / temperature[:, None], dim=-1)
    k = max(seqs[i].params.logprobs for i in rows)
    top, top_ids = logprobs.topk(k, dim=-1)
    chosen = logprobs.gather(1, tokens[index][:, None]).squeeze(1)
    return Logprobs(rows, chosen, top, top_ids)
