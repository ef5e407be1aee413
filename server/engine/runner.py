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
from .penalties import Penalties
from .prompt_logprobs import prompt_logprobs
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
                 graphs: DecodeGraphs | None = None, max_batch_size: int = 256):
        """max_batch_size: the scheduler's, which hands out that many penalty rows (Sequence.penalty_row)."""
        self.model, self.cache, self.adapter_slots, self.device = model, cache, adapter_slots, device
        self.graphs = graphs
        self.penalties = Penalties(max_batch_size, device)
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

        Passes of single tokens replay a CUDA graph when there are graphs; passes with prompt chunks, or that
        give prompt logprobs, run eagerly. Forks' blocks are copied first (their source wrote them in passes
        launched before); prompt logprobs, where asked, land in seq.prompt_logprobs."""
        for w in work:
            if w.copy is not None:
                self.cache.copy_block(*w.copy)
        bs = self.cache.block_size
        tokens, positions, slots, lora_slots, rows, chunks, tables, echoes = [], [], [], [], [], [], [], []
        for w in work:
            if w.seq.params.prompt_logprobs and not w.seq.output_ids and w.start < len(w.seq.prompt_ids) - 1:
                echoes.append((w, len(tokens)))
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
        if self.graphs is not None and not chunks and not echoes:
            projections = frozenset().union(*(self.adapter_slots.projections[s] for s in lora_slots))
            logits = self.graphs.decode(tokens, positions, lora_slots, slots, tables, projections,
                                        None if fed is None else fed.tokens)
            if len(rows) == len(work):
                return logits
            return logits[torch.tensor(rows, dtype=torch.long, device=self.device)]
        if fed is not None:
            raise ValueError("chained decode needs CUDA graphs")
        width = max((len(t) for t in tables), default=0)
        lora = LoraBatch.build(lora_slots, self.adapter_slots.ranks, self.adapter_slots.projections, 1, self.device,
                               segments=bool(chunks) and not self.model.kernels)
        batch = self.model.batch(torch.tensor(positions, device=self.device), torch.tensor(slots, device=self.device),
                                 torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32,
                                              device=self.device).view(len(tables), width),
                                 len(tables), tuple(chunks), lora, bs)
        x, delta = self.model.residual(torch.tensor(tokens, device=self.device)[:, None], batch, self.cache)
        for w, row in echoes:
            self._prompt_logprobs(w, x[row:row + w.length], delta[row:row + w.length])
        rows = torch.tensor(rows, dtype=torch.long, device=self.device)
        return self.model.logits(x.index_select(0, rows), delta.index_select(0, rows))    # [len(rows), vocab]

    def _prompt_logprobs(self, w: Work, x: torch.Tensor, delta: torch.Tensor) -> None:
        """Adds the logprobs of the prompt tokens that positions [w.start, w.end) predict; the whole prompt's go
        to the request's forks too, which do not compute it."""
        seq = w.seq
        got = prompt_logprobs(self.model, x, delta, seq, w.start)
        seq.prompt_logprobs = got if w.start == 0 else (*(seq.prompt_logprobs or ()), *got)
        if w.end >= len(seq.prompt_ids) - 1:
            for fork in seq.forks:
                fork.prompt_logprobs = seq.prompt_logprobs

    @torch.inference_mode()
    def launch(self, work: list[Work], fed: DecodePass | None = None) -> DecodePass:
        """forward() and sampling, with the tokens' copy to the host started but not waited for."""
        seqs = [w.seq for w in work if w.samples]
        self.penalties.admit([w.seq for w in work if w.admitted], self.model.args.vocab_size)
        tokens, logprobs = sample_on_device(self.forward(work, fed), seqs, self.penalties)
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
