"""Prompt logprobs (completions' `echo` with `logprobs`), from the prefill pass itself.

Each prompt token after the first gets the log-softmax, at the position before it, of the model's raw
logits (no temperature, penalty or grammar: none applies to a prompt), and its `k` likeliest
alternatives. The first token has no logprob (None: nothing comes before it), as OpenAI reports it.
"""
from __future__ import annotations

import torch

from ..model.llama import Transformer
from .sequence import Sequence, TokenLogprob

# Positions per vocabulary-wide matmul: bounds the logits held at once (e.g. 512 x 32,000 x 4 B = 64 MiB).
CHUNK = 512


def prompt_logprobs(model: Transformer, x: torch.Tensor, delta: torch.Tensor, row: int,
                    seq: Sequence) -> tuple[TokenLogprob, ...]:
    """x, delta [B, T, dim]: the prefill's residual stream and last block output; `row` is `seq`'s row.
    -> one TokenLogprob per prompt token, with seq.params.logprobs (or 0) alternatives each after the first."""
    ids = seq.prompt_ids
    k = seq.params.logprobs or 0
    targets = torch.tensor(ids[1:], device=x.device)
    chosen, top, top_ids = [], [], []
    for start in range(0, len(ids) - 1, CHUNK):
        end = min(start + CHUNK, len(ids) - 1)
        logprobs = torch.log_softmax(model.logits(x[row, start:end], delta[row, start:end]), dim=-1)  # [c, vocab]
        chosen.append(logprobs.gather(1, targets[start:end, None]).squeeze(1))
        if k:
            values, indices = logprobs.topk(k, dim=-1)
            top.append(values)
            top_ids.append(indices)
    text = seq.text.token_text
    first = TokenLogprob(ids[0], text(ids[0]), None)
    if not chosen:
        return (first,)
    chosen_host = torch.cat(chosen).tolist()
    top_host = torch.cat(top).tolist() if k else [[]] * len(chosen_host)
    ids_host = torch.cat(top_ids).tolist() if k else [[]] * len(chosen_host)
    return first, *(TokenLogprob(token, text(token), lp, tuple((t, text(t), v) for t, v in zip(alt_ids, alts)))
                     for token, lp, alt_ids, alts in zip(ids[1:], chosen_host, ids_host, top_host))
