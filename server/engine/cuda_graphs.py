"""CUDA graphs of the decode pass: one kernel-launch replay per step instead of ~2,500 launches.

Decode of a 7B model is a few milliseconds of GPU work but tens of milliseconds of Python and
launch overhead in eager mode (measured on an H100: BENCHMARKS.md). A graph is captured per
(rows, context length, LoRA projections) bucket (one context with our attention kernel), all of them at start-up (`capture_all`): a capture
runs the step three times and once took 0.5 s at 7B, which would stall every running stream if it
happened on first use of a bucket. Shapes inside are static, so a graph applies LoRA at
the server's largest rank (base-model rows read slot 0, which is zero; the Triton kernels skip
them and every rank past an adapter's own), and attends over the bucket's whole context with a mask.

Capture runs the step first (warm-up) with the current inputs, so it only writes KV entries that
step would write anyway (at start-up: position 0 of free slots, which prefill overwrites).
"""
from __future__ import annotations

import itertools

import torch

from adapters.formats.adapter_dir import PROJECTIONS

from ..model.kv_cache import KVCache
from ..lora.batch import LoraBatch
from ..model.llama import Transformer

_MIN_CONTEXT = 128
# Which projections a graph applies LoRA to: none (base-model rows only), attention, all seven. A
# step replays the smallest set that covers what its rows' adapters target, so it launches no LoRA
# kernels for projections nobody uses.
_LORA_SETS = (frozenset(), frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}), frozenset(PROJECTIONS))


def _buckets(limit: int, start: int) -> list[int]:
    sizes, size = [], start
    while size < limit:
        sizes.append(size)
        size *= 2
    return [*sizes, limit]


class DecodeGraphs:
    def __init__(self, model: Transformer, cache: KVCache, max_lora_rank: int, device: torch.device):
        self.model, self.cache, self.max_lora_rank = model, cache, max_lora_rank
        self.row_buckets = _buckets(cache.num_slots, 1)
        # Our decode attention kernel reads each row's own length, so one context serves every step.
        self.context_buckets = ([cache.max_seq_len] if model.kernels else
                                _buckets(cache.max_seq_len, min(_MIN_CONTEXT, cache.max_seq_len)))
        rows = cache.num_slots
        # tokens, positions and LoRA slots of each row, and the row of each sequence: one copy a step
        # from pinned host memory, two buffers taken in turn so a step can be prepared while the
        # previous one's copy may still be in flight (nothing else waits for the device here).
        self._host = [torch.zeros(4, rows, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]   # each buffer's last copy to the device
        self._turn = 0
        self._inputs = torch.zeros(4, rows, dtype=torch.long, device=device)
        self.tokens, self.positions, self.lora_slots = self._inputs[0, :, None], self._inputs[1], self._inputs[2]
        self._graphs: dict[tuple[int, int, frozenset[str]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def decode(self, tokens: list[int], positions: list[int], lora_slots: list[int], projections: frozenset[str],
               seq_rows: list[int], fed: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as the eager decode: rows are cache slots 0..len(tokens)-1, `projections` is what
        the rows' adapters target -> logits [len(seq_rows), vocab] of the sequences' rows, in order.
        fed: the sequences' input tokens [len(seq_rows)] still on the device (what the pass before
        sampled), in place of `tokens`, so this pass can be launched before the host has seen them."""
        used = len(tokens)
        rows = next(b for b in self.row_buckets if b >= used)
        context = next(b for b in self.context_buckets if b >= max(positions) + 1)
        # Rows past `used` are free cache slots: they decode a dummy token at position 0.
        pad = [0] * (rows - used)
        host, copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()     # this buffer's copy two passes ago (long done when the engine runs it)
        host[:, :rows] = torch.tensor([tokens + pad, positions + pad, lora_slots + pad,
                                       seq_rows + [0] * (rows - len(seq_rows))])
        self._inputs[:, :rows].copy_(host[:, :rows], non_blocking=True)
        copied.record()
        index = self._inputs[3, :len(seq_rows)]
        if fed is not None:
            self._inputs[0].index_copy_(0, index, fed)
        key = (rows, context, next(s for s in _LORA_SETS if projections <= s))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(*key)
        graph[0].replay()
        return graph[1].index_select(0, index)

    def capture_all(self) -> int:
        """Captures every (rows, context, LoRA projections) bucket now; returns how many."""
        for key in itertools.product(self.row_buckets, self.context_buckets, _LORA_SETS):
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
        return len(self._graphs)

    def _forward(self, rows: int, context: int, projections: frozenset[str]) -> torch.Tensor:
        lora = LoraBatch(self.lora_slots[:rows], self.max_lora_rank, projections, None)
        batch = self.model.decode_batch(self.positions[:rows], context, lora)
        return self.model(self.tokens[:rows], batch, self.cache)

    def _capture(self, rows: int, context: int,
                 projections: frozenset[str]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):   # the real step, twice: lazy initialisation stays out of the graph
                self._forward(rows, context, projections)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(rows, context, projections)
        return graph, logits
