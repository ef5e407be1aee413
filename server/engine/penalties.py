"""Logit bias and the presence, frequency and repetition penalties, per row on the device.

Semantics, for a row with output token counts c[t] and prompt tokens P (l: the row's logits):
    l[t] += logit_bias[t]                                        (OpenAI: a bias in [-100, 100])
    if c[t] > 0 or t in P:  l[t] = l[t] / r if l[t] > 0 else l[t] * r      (repetition r, transformers)
    l[t] -= c[t] * frequency + (c[t] > 0) * presence            (OpenAI: generated tokens only)
applied in that order, before the grammar mask and the temperature.

The state is one table row per running request (Sequence.penalty_row, handed out by the scheduler), on
the device, allocated the first time a request asks for any of these: counts [rows, vocab], prompt tokens
[rows, vocab], the bias as [rows, 300] token ids and values, and the three penalties [rows, 3], so a step
copies only the rows' indices to the device. Counts are
updated on the device from the sampled tokens, so a decode pass launched before the host has read
the previous pass's tokens (CUDA graphs) still sees them. A row is reset when its request is admitted (to
the tokens it has generated, for one preempted and admitted again),
and only rows that asked are read or written: one row's penalty never touches another row's logits.
"""
from __future__ import annotations

import torch

from .sequence import Sequence

MAX_BIASED = 300       # logit_bias entries a row may have (OpenAI's limit; the edge refuses more)


def _penalized(seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(seqs) if s.params.penalized]


def _rows_and_held(seqs: list[Sequence], rows: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalised rows' indices in the batch and the table rows they hold, [R] each, in one copy to the device."""
    both = torch.tensor([rows, [seqs[i].penalty_row for i in rows]], device=device)
    return both[0], both[1]


class Penalties:
    def __init__(self, num_rows: int, device: torch.device):
        self.num_rows, self.device = num_rows, device
        self.counts: torch.Tensor | None = None      # [rows, vocab] float32: times each token was generated
        self.in_prompt: torch.Tensor | None = None   # [rows, vocab] bool: the token is in the prompt
        # logit_bias, sparse: [rows, MAX_BIASED] token ids and their biases (padding: token 0, bias 0)
        self.bias_ids: torch.Tensor | None = None
        self.bias_values: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None      # [rows, 3] float32: presence, frequency, repetition

    def _allocate(self, vocab_size: int) -> None:
        shape = (self.num_rows, vocab_size)
        self.counts = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.in_prompt = torch.zeros(shape, dtype=torch.bool, device=self.device)
        self.bias_ids = torch.zeros(self.num_rows, MAX_BIASED, dtype=torch.long, device=self.device)
        self.bias_values = torch.zeros(self.num_rows, MAX_BIASED, dtype=torch.float32, device=self.device)
        self.scales = torch.zeros(self.num_rows, 3, dtype=torch.float32, device=self.device)

    @torch.inference_mode()   # the state is made in the runner's inference mode: updated in it too
    def admit(self, seqs: list[Sequence], vocab_size: int) -> None:
        """Resets the rows of newly admitted `seqs` that ask for a penalty or a bias: their prompt, and the counts
        of what they generated before (a preempted request's output; none for a new one)."""
        rows = _penalized(seqs)
        if not rows:
            return
        if self.counts is None:
            self._allocate(vocab_size)
        held = torch.tensor([seqs[i].penalty_row for i in rows], device=self.device)
        self.counts[held] = 0
        self.in_prompt[held] = False
        self.bias_ids[held] = 0
        self.bias_values[held] = 0
        self.scales[held] = torch.tensor([[seqs[i].params.presence_penalty, seqs[i].params.frequency_penalty,
                                           seqs[i].params.repetition_penalty] for i in rows], device=self.device)
        # One scatter for every row's prompt tokens and one for every row's bias.
        prompt_held = [seqs[i].penalty_row for i in rows for _ in seqs[i].prompt_ids]
        prompt_ids = [t for i in rows for t in seqs[i].prompt_ids]
        self.in_prompt[torch.tensor(prompt_held, dtype=torch.long, device=self.device),
                       torch.tensor(prompt_ids, dtype=torch.long, device=self.device)] = True
        output_held = [seqs[i].penalty_row for i in rows for _ in seqs[i].output_ids]
        if output_held:
            output_ids = [t for i in rows for t in seqs[i].output_ids]
            self.counts.index_put_((torch.tensor(output_held, dtype=torch.long, device=self.device),
                                    torch.tensor(output_ids, dtype=torch.long, device=self.device)),
                                   torch.ones(len(output_ids), device=self.device), accumulate=True)
        biased = [(seqs[i].penalty_row, n, token, value) for i in rows
                  for n, (token, value) in enumerate(seqs[i].params.logit_bias)]
        if biased:
            row, n, token, value = (torch.tensor(column, device=self.device) for column in zip(*biased))
            self.bias_ids[row, n] = token
            self.bias_values[row, n] = value.float()

    @torch.inference_mode()
    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits [B, vocab] -> the same with each penalised row's bias and penalties applied; the input is
        left as it is (a graph's output), and returned as is when no row asks."""
        rows = _penalized(seqs)
        if not rows or self.counts is None:
            return logits
        index, held = _rows_and_held(seqs, rows, logits.device)
        presence, frequency, repetition = self.scales[held].T[:, :, None]   # [R, 1] each
        counts = self.counts[held]                                          # [R, vocab]
        generated = counts > 0
        picked = logits[index].scatter_add(1, self.bias_ids[held], self.bias_values[held])
        seen = generated | self.in_prompt[held]
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
        index, held = _rows_and_held(seqs, rows, tokens.device)
        self.counts.index_put_((held, tokens[index]), torch.ones(len(rows), device=tokens.device), accumulate=True)
