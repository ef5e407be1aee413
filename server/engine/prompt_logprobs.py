"""Prompt logprobs (completions' `echo` with `logprobs`), from the passes over the prompt themselves.

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


def prompt_logprobs(model: Transformer, x: torch.Tensor, delta: torch.Tensor, seq: Sequence,
                    start: int) -> tuple[TokenLogprob, ...]:
    """x, delta [L, dim]: the residual stream and last block output of `seq`'s tokens at positions start..
    start+L-1 (a chunk of its prompt) -> one TokenLogprob per prompt token they predict, with
    seq.params.logprobs (or 0) alternatives each, after the first token's (no logprob) when start is 0."""
    ids = seq.prompt_ids
    end = min(start + x.shape[0], len(ids) - 1)        # the prompt's last position predicts the answer
    k = seq.params.logprobs or 0
    targets = torch.tensor(ids[start + 1:end + 1], device=x.device)
    chosen, top, top_ids = [], [], []
    for offset in range(0, end - start, CHUNK):
        stop = min(offset + CHUNK, end - start)
        logprobs = torch.log_softmax(model.logits(x[offset:stop], delta[offset:stop]), dim=-1)  # [c, vocab]
        chosen.append(logprobs.gather(1, targets[offset:stop, None]).squeeze(1))
        if k:
            values, indices = logprobs.topk(k, dim=-1)
            top.append(values)
            top_ids.append(indices)
    text = seq.text.token_text
    first = (TokenLogprob(ids[0], text(ids[0]), None),) if start == 0 else ()
    if not chosen:
        return first
    chosen_host = torch.cat(chosen).tolist()
    top_host = torch.cat(top).tolist() if k else [[]] * len(chosen_host)
    ids_host = torch.cat(top_ids).tolist() if k else [[]] * len(chosen_host)
    return *first, *(TokenLogprob(token, text(token), lp, tuple((t, text(t), v) for t, v in zip(alt_ids, alts)))
                     for token, lp, alt_ids, alts in zip(ids[start + 1:end + 1], chosen_host, ids_host, top_host))
