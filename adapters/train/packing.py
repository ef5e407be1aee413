"""Packing: several examples in one row of max_seq_len tokens, each attending only to itself.

Short rows padded to the longest in their micro-batch spend most of a step on padding; packed, a step's
tokens are nearly all real. Each example keeps its own positions (they restart at 0) and its own
block of a causal mask (see `Batch.model_inputs`), so its loss and gradients are those it has alone.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .datasets import IGNORE, Batch, Example, place

# Rows packed together: enough for first-fit to fill rows nearly full, few enough that packing an epoch
# stays linear in the rows, and that rows of one window do not all end up side by side.
PACK_WINDOW = 1024


def pack(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """The rows of `order` (indices into `lengths`) in bins of at most `capacity` tokens, first-fit
    decreasing within windows of PACK_WINDOW rows. Every row fits a bin: the data reader rejects or splits
    rows longer than max_seq_len."""
    bins: list[list[int]] = []
    for start in range(0, len(order), PACK_WINDOW):
        window_bins: list[list[int]] = []
        room: list[int] = []
        # Longest first, so the short rows fill the gaps; the sort is stable, so ties keep the seeded order.
        for j in sorted(order[start:start + PACK_WINDOW], key=lambda j: -lengths[j]):
            fits = next((b for b, free in enumerate(room) if lengths[j] <= free), None)
            if fits is None:
                window_bins.append([j])
                room.append(capacity - lengths[j])
            else:
                window_bins[fits].append(j)
                room[fits] -= lengths[j]
        bins.extend(window_bins)
    return bins


def collate_packed(rows: Sequence[Sequence[Example]], pad_id: int) -> Batch:
    """A micro-batch of packed rows, each a sequence of examples laid end to end, right-padded to the
    longest row. Labels are the answers' ids, as unpacked, except that an example's first token never
    carries loss: unpacked the shift drops it, packed it would be predicted from the example before."""
    width = max(sum(example.num_tokens for example in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.empty((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        start = 0
        for example in row:
            place(example, input_ids[i], attention_mask[i], labels[i], start)
            labels[i, start] = IGNORE
            position_ids[i, start:start + example.num_tokens] = torch.arange(example.num_tokens)
            start += example.num_tokens
        # The padding is a block of its own: it comes last, so no real token attends to it.
        position_ids[i, start:] = torch.arange(width - start)
    return Batch(input_ids, attention_mask, labels, position_ids)
