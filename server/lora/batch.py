"""Batched LoRA: one forward adds a different adapter's delta to every row (Punica's BGMV/SGMV idea).

Each (layer, projection) keeps the A and B of every resident adapter stacked by slot, padded to the
server's largest rank, with the scaling folded into B; slot 0 stays zero and stands for the base
model. A `LoraBatch`, built once per step, tells every layer which slot each row uses.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adapters.formats.adapter_dir import LoraWeights

from ..host_memory import lazy_zeros


@dataclass(frozen=True, slots=True)
class LoraBatch:
    """Semantics: for token row i, y[i] += x[i] @ A[slot[i], :rank].T @ B[slot[i], :, :rank].T.

    `rank` is the largest rank among the batch's adapters, so stacks are read only that far.
    On the torch path (CPU), `segments` (a pass with prompt chunks) lists each distinct adapter with its
    rows, prompt and decode rows alike: one pair of GEMMs per adapter (SGMV); without segments (decode
    only) A and B are gathered per row and applied with two batched GEMVs (BGMV). The Triton kernels
    (CUDA) take every token row with its own slot, prefill and decode alike: two launches a
    projection whatever the mix, where segments cost four small launches per adapter."""
    slots: torch.Tensor | None                      # [B * T] slot per token row; None when no row has an adapter
    rank: int
    projections: frozenset[str]                     # what any adapter of the batch targets
    segments: tuple[tuple[int, torch.Tensor], ...] | None  # (slot, rows [n]) per adapter, torch path only

    @classmethod
    def build(cls, row_slots: list[int], slot_ranks: dict[int, int], slot_projections: dict[int, frozenset[str]],
              tokens_per_row: int, device: torch.device, segments: bool = True) -> "LoraBatch":
        """row_slots: the slot of each of B rows of `tokens_per_row` tokens. segments: whether the torch path
        should run it by segments (the kernels never read them: no per-adapter index tensors)."""
        used = sorted({s for s in row_slots if s != 0})
        if not used:
            return cls(None, 0, frozenset(), None)
        slots = torch.tensor(row_slots, dtype=torch.long).repeat_interleave(tokens_per_row).to(device)
        by_adapter = None
        if segments:
            by_adapter = tuple((s, torch.tensor([i for i, r in enumerate(row_slots) if r == s], device=device))
                               for s in used)
        return cls(slots, max(slot_ranks[s] for s in used),
                   frozenset().union(*(slot_projections[s] for s in used)), by_adapter)


@dataclass(frozen=True, slots=True)
class SlotWeights:
    """An adapter as the stacks take it, per (layer, projection): A [r, in] and scaling·B [out, r] in
    the compute dtype, in pinned host memory on CUDA. Made when the adapter is read, off the engine
    thread, so filling a slot on it is a few asynchronous copies and no host arithmetic."""
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    targets: frozenset[str]

    @classmethod
    def stage(cls, weights: LoraWeights, dtype: torch.dtype, pin: bool) -> "SlotWeights":
        def ready(t: torch.Tensor) -> torch.Tensor:
            t = t.to(dtype).contiguous()
            return t.pin_memory() if pin else t

        # Scaling is applied in float32 and rounded once, as a dense merge of the same adapter would be.
        return cls({key: ready(a) for key, a in weights.a.items()},
                   {key: ready(b.float() * weights.config.scaling_of(*key)) for key, b in weights.b.items()},
                   frozenset(weights.config.target_modules))

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


class LoraStack:
    """One projection of one layer: A [slots, max_rank, in] and scaling·B [slots, out, max_rank]."""

    def __init__(self, projection: str, num_slots: int, max_rank: int, in_features: int, out_features: int,
                 dtype: torch.dtype, device: torch.device):
        self.projection = projection
        self.a = lazy_zeros((num_slots, max_rank, in_features), dtype, device)
        self.b = lazy_zeros((num_slots, out_features, max_rank), dtype, device)
        self.ranks = torch.zeros(num_slots, dtype=torch.int32, device=device)   # read by the kernels at replay

    @property
    def size_bytes(self) -> int:
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def load(self, slot: int, a: torch.Tensor | None, scaled_b: torch.Tensor | None) -> None:
        """Puts one adapter's A [r, in] and scaling·B [out, r] (SlotWeights) in `slot`; None clears the
        slot (not targeted). The copies do not wait for the device when the sources are pinned."""
        rank = 0 if a is None else a.shape[0]
        self.ranks[slot] = rank
        if a is not None:
            self.a[slot, :rank].copy_(a, non_blocking=True)
            self.b[slot, :, :rank].copy_(scaled_b, non_blocking=True)
        # The torch path reads up to the batch's largest rank: past this adapter's own it must be zero.
        self.a[slot, rank:].zero_()
        self.b[slot, :, rank:].zero_()

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """y [B, T, out] += LoRA delta of x [B, T, in], per the batch's slots (see LoraBatch)."""
        if batch.slots is None or self.projection not in batch.projections:
            return y
        rank = batch.rank
        if batch.segments is not None:
            for slot, rows in batch.segments:
                a, b = self.a[slot, :rank], self.b[slot, :, :rank]             # [r, in], [out, r]
                y.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
            return y
        # index_select, not a[slots, :rank]: on the CPU advanced indexing of the stack took ~10 ms for
        # one row against 9 µs (a whole decode step of the default model is ~70 ms).
        a = self.a.index_select(0, batch.slots)[:, :rank]                  # [B, r, in]
        b = self.b.index_select(0, batch.slots)[:, :, :rank]               # [B, out, r]
        return torch.baddbmm(y, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


class LoraGroup:
    """The stacks of projections that share one base matmul (q|k|v, gate|up, or one alone).

    With `kernels` (CUDA) every token row goes through server.kernels.lora_bgmv, all the group's
    slices in one shrink and one expand launch, reading each row's adapter in place up to its own
    rank for each projection (0 where it leaves one alone); otherwise each stack's torch path."""

    def __init__(self, stacks: list[LoraStack], kernels: bool = False):
        self.stacks = stacks
        self.projections = frozenset(s.projection for s in stacks)
        self._bgmv = None
        if kernels:
            from ..kernels.lora_bgmv import LoraSlice, lora_bgmv

            self._bgmv = lora_bgmv
            self._slices = [LoraSlice(s.a, s.b, s.ranks) for s in stacks]

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> list[torch.Tensor]:
        """y [B, T, sum out] (the group's base outputs side by side) += LoRA deltas of x [B, T, in];
        -> one [B, T, out] per projection, in order."""
        outs = y.split([s.b.shape[1] for s in self.stacks], dim=-1) if len(self.stacks) > 1 else (y,)
        if batch.slots is None or not self.projections & batch.projections:
            return list(outs)
        if self._bgmv is not None:
            self._bgmv(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self._slices, batch.slots)
            return list(outs)
        return [stack.add_delta(out, x, batch) for out, stack in zip(outs, self.stacks)]
