"""Turns a list of sequences into one forward pass: builds the step's tensors, returns logits, or for
decode the sampled tokens, launched without waiting for them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.slots import AdapterSlots
from .cuda_graphs import DecodeGraphs
from ..model.kv_cache import KVCache
from ..lora.batch import LoraBatch
from ..model.llama import Batch, Transformer
from .penalties import Penalties
from .prompt_logprobs import prompt_logprobs
from .sampler import Logprobs, sample_on_device
from .sequence import Sequence


@dataclass(slots=True)
class DecodePass:
    """A decode pass on its way: its tokens are on the device now and reach the host at collect()."""
    seqs: list[Sequence]
    tokens: torch.Tensor                 # [n] int64 on the device, in the order of seqs
    host: torch.Tensor                   # [n] their copy in host memory, complete once `ready` is
    ready: torch.cuda.Event | None       # None when the device is the CPU: nothing is asynchronous
    logprobs: Logprobs | None = None     # of the rows that asked for them, read at collect()


class ModelRunner:
    def __init__(self, model: Transformer, cache: KVCache, adapter_slots: AdapterSlots, device: torch.device,
                 graphs: DecodeGraphs | None = None):
        self.model, self.cache, self.adapter_slots, self.device = model, cache, adapter_slots, device
        self.graphs = graphs
        self.penalties = Penalties(cache.num_slots, device)
        # Pinned landing places for sampled tokens, taken in turn (see DecodeGraphs: same reasoning).
        self._landing = ([torch.zeros(cache.num_slots, dtype=torch.long, pin_memory=True) for _ in range(2)]
                         if graphs is not None else None)
        self._turn = 0

    @property
    def can_chain(self) -> bool:
        """Whether a decode pass can be launched from the tokens of one still running (CUDA graphs)."""
        return self.graphs is not None

    def _lora(self, row_slots: list[int], tokens_per_row: int) -> LoraBatch:
        return LoraBatch.build(row_slots, self.adapter_slots.ranks, self.adapter_slots.projections, tokens_per_row,
                               self.device, segments=not self.model.kernels)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Whole prompts of `seqs`, right-padded into one pass -> logits [n, vocab] of their last tokens.
        A request's forks (n > 1, admitted right after it) are not run: their slots get a copy of its
        prompt's KV entries, and its logits. Prompt logprobs, where asked, land in seq.prompt_logprobs."""
        forks = {id(f) for s in seqs for f in s.forks}
        prefilled = [s for s in seqs if id(s) not in forks]
        length = max(len(s.prompt_ids) for s in prefilled)
        tokens = torch.zeros(len(prefilled), length, dtype=torch.long)
        for row, seq in enumerate(prefilled):
            tokens[row, :len(seq.prompt_ids)] = torch.tensor(seq.prompt_ids)
        positions = torch.arange(length, device=self.device).expand(len(prefilled), length)
        batch = Batch(prefill=True,
                      slots=torch.tensor([s.kv_slot for s in prefilled], device=self.device),
                      positions=positions, cos=self.model.rope_cos[positions], sin=self.model.rope_sin[positions],
                      decode_mask=None, lora=self._lora([s.lora_slot for s in prefilled], length))
        x, delta = self.model.residual(tokens.to(self.device), batch, self.cache)      # [P, T, dim] each
        rows = torch.arange(len(prefilled), device=self.device)
        last = torch.tensor([len(s.prompt_ids) - 1 for s in prefilled], device=self.device)
        logits = self.model.logits(x[rows, last], delta[rows, last])                   # [P, vocab]
        row_of = {}
        for row, seq in enumerate(prefilled):
            if seq.params.prompt_logprobs:
                seq.prompt_logprobs = prompt_logprobs(self.model, x, delta, row, seq)
            if seq.forks:
                self.cache.fork(seq.kv_slot, [f.kv_slot for f in seq.forks], len(seq.prompt_ids))
            for member in (seq, *seq.forks):
                row_of[id(member)] = row
                member.prompt_logprobs = seq.prompt_logprobs
        logits = logits[torch.tensor([row_of[id(s)] for s in seqs], device=self.device)]     # [n, vocab]
        self.penalties.admit(seqs, logits.shape[-1])
        return logits

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], fed: DecodePass | None = None) -> torch.Tensor:
        """One new token for every sequence -> logits [n, vocab], in the order of `seqs`.
        fed: the pass launched just before for exactly these seqs, whose tokens (still on the
        device, not yet in seq.output_ids) are this pass's inputs.

        Rows are cache slots 0..B-1 (B = highest slot in use + 1); a free slot inside that range
        rides along as a base-model row whose output is dropped."""
        rows = max(s.kv_slot for s in seqs) + 1
        ahead = 0 if fed is None else 1
        tokens, positions, lora_slots = [0] * rows, [0] * rows, [0] * rows
        for seq in seqs:
            tokens[seq.kv_slot] = seq.output_ids[-1] if fed is None else 0
            positions[seq.kv_slot] = seq.num_tokens - 1 + ahead
            lora_slots[seq.kv_slot] = seq.lora_slot
        seq_rows = [s.kv_slot for s in seqs]
        if self.graphs is not None:
            projections = frozenset().union(*(self.adapter_slots.projections[s] for s in lora_slots))
            return self.graphs.decode(tokens, positions, lora_slots, projections, seq_rows,
                                      None if fed is None else fed.tokens)
        if fed is not None:
            raise ValueError("chained decode needs CUDA graphs")
        logits = self._decode_eager(tokens, positions, lora_slots)
        return logits[torch.tensor(seq_rows, device=self.device)]

    @torch.inference_mode()
    def launch_decode(self, seqs: list[Sequence], fed: DecodePass | None = None) -> DecodePass:
        """decode() and sampling, with the tokens' copy to the host started but not waited for."""
        tokens, logprobs = sample_on_device(self.decode(seqs, fed), seqs, self.penalties)
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

    def _decode_eager(self, tokens: list[int], positions: list[int], lora_slots: list[int]) -> torch.Tensor:
        batch = self.model.decode_batch(torch.tensor(positions, device=self.device), max(positions) + 1,
                                        self._lora(lora_slots, 1))
        return self.model(torch.tensor(tokens, device=self.device)[:, None], batch, self.cache)
