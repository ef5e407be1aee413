"""Turns a list of sequences into one forward pass: builds the step's tensors, returns logits."""
from __future__ import annotations

import torch

from .adapter_slots import AdapterSlots
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .lora_batch import LoraBatch
from .model import Batch, Transformer
from .sequence import Sequence


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, adapter_slots: AdapterSlots, device: torch.device,
                 graphs: DecodeGraphs | None = None):
        self.model, self.cache, self.adapter_slots, self.device = model, cache, adapter_slots, device
        self.graphs = graphs

    def _lora(self, row_slots: list[int], tokens_per_row: int) -> LoraBatch:
        return LoraBatch.build(row_slots, self.adapter_slots.ranks, self.adapter_slots.projections, tokens_per_row,
                               self.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Whole prompts of `seqs`, right-padded into one pass -> logits [n, vocab] of their last tokens."""
        length = max(len(s.prompt_ids) for s in seqs)
        tokens = torch.zeros(len(seqs), length, dtype=torch.long)
        for row, seq in enumerate(seqs):
            tokens[row, :len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(length, device=self.device).expand(len(seqs), length)
        batch = Batch(prefill=True,
                      slots=torch.tensor([s.kv_slot for s in seqs], device=self.device),
                      positions=positions, cos=self.model.rope_cos[positions], sin=self.model.rope_sin[positions],
                      decode_mask=None, lora=self._lora([s.lora_slot for s in seqs], length))
        last = torch.tensor([len(s.prompt_ids) - 1 for s in seqs], device=self.device)
        return self.model(tokens.to(self.device), batch, self.cache, last)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One new token for every sequence -> logits [n, vocab], in the order of `seqs`.

        Rows are cache slots 0..B-1 (B = highest slot in use + 1); a free slot inside that range
        rides along as a base-model row whose output is dropped."""
        rows = max(s.kv_slot for s in seqs) + 1
        tokens, positions, lora_slots = [0] * rows, [0] * rows, [0] * rows
        for seq in seqs:
            tokens[seq.kv_slot] = seq.output_ids[-1]
            positions[seq.kv_slot] = seq.num_tokens - 1
            lora_slots[seq.kv_slot] = seq.lora_slot
        if self.graphs is not None:
            projections = frozenset().union(*(self.adapter_slots.projections[s] for s in lora_slots))
            logits = self.graphs.decode(tokens, positions, lora_slots, projections)
        else:
            logits = self._decode_eager(tokens, positions, lora_slots)
        return logits[torch.tensor([s.kv_slot for s in seqs], device=self.device)]

    def _decode_eager(self, tokens: list[int], positions: list[int], lora_slots: list[int]) -> torch.Tensor:
        batch = self.model.decode_batch(torch.tensor(positions, device=self.device), max(positions) + 1,
                                        self._lora(lora_slots, 1))
        return self.model(torch.tensor(tokens, device=self.device)[:, None], batch, self.cache)
