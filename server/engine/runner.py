"""Turns the scheduler's work into one forward pass: builds the pass's tensors, returns logits, or the
sampled tokens, launched without waiting for them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.batch import LoraBatch
from ..lora.slots import AdapterSlots
from ..model.kv_cache import PagedKVCache
from ..model.llama import Chunk, Transformer
from .cuda_graphs import DecodeGraphs
from .sampler import Logprobs, sample_on_device
from .sequence import Sequence, Work


@dataclass(slots=True)
class DecodePass:
    """A pass on its way: its tokens are on the device now and reach the host at collect()."""
    seqs: list[Sequence]                 # the requests it gives a token, in the order of `tokens`
    tokens: torch.Tensor                 # [n] int64 on the device
    host: torch.Tensor                   # [n] their copy in host memory, complete once `ready` is
    ready: torch.cuda.Event | None       # None when the device is the CPU: nothing is asynchronous
    logprobs: Logprobs | None = None     # of the rows that asked for them, read at collect()


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedKVCache, adapter_slots: AdapterSlots, device: torch.device,
                 graphs: DecodeGraphs | None = None):
        self.model, self.cache, self.adapter_slots, self.device = model, cache, adapter_slots, device
        self.graphs = graphs
        # Pinned landing places for sampled tokens, taken in turn (see DecodeGraphs: same reasoning).
        self._landing = ([torch.zeros(graphs.max_rows, dtype=torch.long, pin_memory=True) for _ in range(2)]
                         if graphs is not None else None)
        self._turn = 0

    @property
    def can_chain(self) -> bool:
        """Whether a decode pass can be launched from the tokens of one still running (CUDA graphs)."""
        return self.graphs is not None

    @torch.inference_mode()
    def forward(self, work: list[Work], fed: DecodePass | None = None) -> torch.Tensor:
        """One pass over `work`, single-token rows first -> logits [n, vocab] of the rows that sample, in order.
        fed: the pass launched just before for exactly these requests, one token each, whose tokens (still on
        the device, not yet in seq.output_ids) are this pass's inputs.

        Passes of single tokens replay a CUDA graph when there are graphs; passes with prompt chunks run eagerly."""
        bs = self.cache.block_size
        tokens, positions, slots, lora_slots, rows, chunks, tables = [], [], [], [], [], [], []
        for w in work:
            ids = w.seq.blocks.ids
            if w.length > 1:
                chunks.append(Chunk(len(tokens), w.length, w.start,
                                    torch.tensor(ids[:-(-w.end // bs)], device=self.device)))
            else:
                tables.append(ids[:w.start // bs + 1])
            tokens += [0] * w.length if fed is not None else w.seq.tokens(w.start, w.end)
            positions += range(w.start, w.end)
            slots += [ids[p // bs] * bs + p % bs for p in range(w.start, w.end)]
            lora_slots += [w.seq.lora_slot] * w.length
            if w.samples:
                rows.append(len(tokens) - 1)
        if self.graphs is not None and not chunks:
            projections = frozenset().union(*(self.adapter_slots.projections[s] for s in lora_slots))
            logits = self.graphs.decode(tokens, positions, lora_slots, slots, tables, projections,
                                        None if fed is None else fed.tokens)
            return logits if len(rows) == len(work) else logits[torch.tensor(rows, dtype=torch.long, device=self.device)]
        if fed is not None:
            raise ValueError("chained decode needs CUDA graphs")
        width = max((len(t) for t in tables), default=0)
        lora = LoraBatch.build(lora_slots, self.adapter_slots.ranks, self.adapter_slots.projections, 1, self.device,
                               segments=bool(chunks) and not self.model.kernels)
        batch = self.model.batch(torch.tensor(positions, device=self.device), torch.tensor(slots, device=self.device),
                                 torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                              device=self.device).view(len(tables), width),
                                 len(tables), tuple(chunks), lora, bs)
        return self.model(torch.tensor(tokens, device=self.device)[:, None], batch, self.cache,
                          torch.tensor(rows, dtype=torch.long, device=self.device))

    @torch.inference_mode()
    def launch(self, work: list[Work], fed: DecodePass | None = None) -> DecodePass:
        """forward() and sampling, with the tokens' copy to the host started but not waited for."""
        seqs = [w.seq for w in work if w.samples]
        tokens, logprobs = sample_on_device(self.forward(work, fed), seqs)
        if self._landing is None:
            return DecodePass(seqs, tokens, tokens, None, logprobs)
        host = self._landing[self._turn][:len(seqs)]
        self._turn ^= 1
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return DecodePass(seqs, tokens, host, ready, logprobs)

    @staticmethod
    def collect(decode_pass: DecodePass) -> tuple[list[int], dict]:
        """Waits for a launched pass's tokens and returns them, in the order of its seqs, and the
        logprobs of the rows that asked for them (by row index)."""
        if decode_pass.ready is not None:
            decode_pass.ready.synchronize()
        tokens = decode_pass.host.tolist()
        if decode_pass.logprobs is None:
            return tokens, {}
        return tokens, decode_pass.logprobs.to_host(decode_pass.seqs, tokens)
