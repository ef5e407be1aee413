"""Logit bias and the presence, frequency and repetition penalties, per row on the device.

Semantics, for a row with output token counts c[t] and prompt tokens P (l: the row's logits):
    l[t] += logit_bias[t]                                        (OpenAI: a bias in [-100, 100])
    if c[t] > 0 or t in P:  l[t] = l[t] / r if l[t] > 0 else l[t] * r      (repetition r, transformers)
    l[t] -= c[t] * frequency + (c[t] > 0) * presence            (OpenAI: generated tokens only)
applied in that order, before the grammar mask and the temperature.

The state is one row per KV-cache slot, on the device, allocated the first time a request asks for
any of these: counts [slots, vocab], prompt tokens [slots, vocab], the bias as [slots, 300] token ids and
values, and the three penalties [slots, 3], so a step copies only the rows' indices to the device. Counts are
updated on the device from the sampled tokens, so a decode pass launched before the host has read
the previous pass's tokens (CUDA graphs) still sees them. A row is reset when its request is admitted,
and only rows that asked are read or written: one row's penalty never touches another row's logits.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

MAX_BIASED = 300       # logit_bias entries a row may have (OpenAI's limit; the edge refuses more)


def _penalized(seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(seqs) if s.params.penalized]


def _rows_and_slots(seqs: list[Sequence], rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalised rows' indices in the batch and their KV slots, [R] each, in one copy to the device."""
    both = torch.tensor([rows, [seqs[i].kv_slot for i in rows]], device=device)
    return both[0], both[1]


class Penalties:
    def __init__(self, num_slots: int, device: torch.device):
        self.num_slots, self.device = num_slots, device
        self.counts: torch.Tensor | None = None      # [slots, vocab] float32: times each token was generated
        self.in_prompt: torch.Tensor | None = None   # [slots, vocab] bool: the token is in the prompt
        # logit_bias, sparse: [slots, MAX_BIASED] token ids and their biases (padding: token 0, bias 0)
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None      # [slots, 3] float32: presence, frequency, repetition

    def _allocate(self, vocab_size: int) -> None:
        shape = (self.num_slots, vocab_size)
        self.counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.bias_ids = torch.zeros(self.num_slots, MAX_BIASED, dtype=torch.long, device=self.device)
        self.bias_values = torch.zeros(self.num_slots, MAX_BIASED, dtype=torch.float32, device=self.device)
        self.scales = torch.zeros(self.num_slots, 3, dtype=torch.float32, device=self.device)

    @torch.inference_mode()   # the state is made in the runner's inference mode: updated in it too
    def admit(self, seqs: list[Sequence], vocab_size: int) -> None:
        """Resets the rows of newly admitted `seqs` that ask for a penalty or a bias: their prompt, no counts."""
        rows = _penalized(seqs)
        if not rows:
            return
        if self.counts is None:
            self._allocate(vocab_size)
        slots = torch.tensor([seqs[i].kv_slot for i in rows], device=self.device)
        self.counts[slots] = 0
        self.in_prompt[slots] = False
        self.bias_ids[slots] = 0
        self.bias_values[slots] = 0
        self.scales[slots] = torch.tensor([[seqs[i].params.presence_penalty, seqs[i].params.frequency_penalty,
                                            seqs[i].params.repetition_penalty] for i in rows], device=self.device)
        # One scatter for every row's prompt tokens and one for every row's bias.
        prompt_slots = [seqs[i].kv_slot for i in rows for _ in seqs[i].prompt_ids]
        prompt_ids = [t for i in rows for t in seqs[i].prompt_ids]
        self.in_prompt[torch.tensor(prompt_slots, dtype=torch.long, device=self.device),
                       torch.tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        biased = [(seqs[i].kv_slot, n, token, value) for i in rows
                  for n, (token, value) in enumerate(seqs[i].params.logit_bias)]
        if biased:
            slot, n, token, value = (torch.tensor(column, device=self.device) for column in zip(*biased))
            self.bias_ids[slot, n] = token
            self.bias_values[slot, n] = value.float()

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, vocab] -> the same with each penalised row's bias and penalties applied; the input is
        left as it is (a graph's output), and returned as is when no row asks."""
        rows = _penalized(seqs)
        if not rows or self.counts is None:
            return logits
        index, slots = _rows_and_slots(seqs, rows, logits.device)
        presence, frequency, repetition = self.scales[slots].T[:, :, None]   # [R, 1] each
        counts = self.counts[slots]                                          # [R, vocab]
        generated = counts > 0
        picked = logits[index].scatter_add(1, self.bias_ids[slots], self.bias_values[slots])
        seen = generated | self.in_prompt[slots]
        picked = torch.where(seen, torch.where(picked > 0, picked / repetition, picked * repetition), picked)
        picked = picked - counts * frequency - generated * presence
        logits = logits.clone()
        logits[index] = picked
        return logits

    @torch.inference_mode()
    def record(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Counts the tokens [B] (on the device) just sampled for `seqs`, in the rows that ask."""
        rows = _penalized(seqs)
        if not rows or self.counts is None:
            return
        index, slots = _rows_and_slots(seqs, rows, tokens.device)
        self.counts.index_put_((slots, tokens[index]), torch.ones(len(rows), device=tokens.device), accumulate=True)
