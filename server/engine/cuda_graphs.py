"""CUDA graphs of the decode pass: one kernel-launch replay per step instead of ~2,500 launches.

Decode of a 7B model is a few milliseconds of GPU work but tens of milliseconds of Python and
launch overhead in eager mode (measured on an H100: BENCHMARKS.md). A graph is captured per
(rows, block-table width, LoRA projections) bucket (one width with our attention kernel), all of them at
start-up (`capture_all`): a capture runs the step three times and once took 0.5 s at 7B, which would
stall every running stream if it happened on first use of a bucket. Shapes inside are static, so a graph
applies LoRA at the server's largest rank (base-model rows read slot 0, which is zero; the Triton kernels
skip them and every rank past an adapter's own), and the torch path attends over the bucket's whole
width with a mask. Block tables, positions and cache slots are fixed-size device buffers, rewritten
before each replay, so the paged cache needs no capture per placement of blocks.

Capture runs the step first (warm-up) with the current inputs, all zero at start-up: every row writes
the scratch block, which no request holds.
"""
from __future__ import annotations

import itertools

import torch

from adapters.formats.adapter_dir import PROJECTIONS

from ..model.kv_cache import PagedKVCache
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
    def __init__(self, model: Transformer, cache: PagedKVCache, max_rows: int, max_blocks: int, max_lora_rank: int,
                 device: torch.device):
        """max_rows: rows of the largest pass; max_blocks: blocks of the longest request (the tables' width)."""
        self.model, self.cache, self.max_rows, self.max_lora_rank = model, cache, max_rows, max_lora_rank
        self.row_buckets = _buckets(max_rows, 1)
        # Our decode attention kernel reads each row's own length, so one context serves every step;
        # the torch path gathers a bucket's blocks per row and masks past each row's position.
        self.block_buckets = ([max_blocks] if model.kernels else
                              _buckets(max_blocks, min(-(-_MIN_CONTEXT // cache.block_size), max_blocks)))
        # tokens, positions, LoRA slots and cache slots of each row, and the rows' block tables: one copy a
        # step from pinned host memory, two buffers taken in turn so a step can be prepared while the
        # previous one's copy may still be in flight (nothing else waits for the device here).
        self._host = [(torch.zeros(4, max_rows, dtype=torch.long, pin_memory=True),
                       torch.zeros(max_rows, max_blocks, dtype=torch.int32, pin_memory=True)) for _ in range(2)]
        self._copied = [torch.cuda.Event(), torch.cuda.Event()]   # each buffer's last copy to the device
        self._turn = 0
        # Fixed device buffers the graphs read; rows past a step's own decode a dummy token at position 0
        # into the scratch block 0 (block_pool.SCRATCH_BLOCK), which no request holds.
        self._inputs = torch.zeros(4, max_rows, dtype=torch.long, device=device)
        self.tables = torch.zeros(max_rows, max_blocks, dtype=torch.int32, device=device)
        self.tokens, self.positions, self.lora_slots, self.slots = (self._inputs[0, :, None], self._inputs[1],
                                                                    self._inputs[2], self._inputs[3])
        self._graphs: dict[tuple[int, int, frozenset[str]], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle()

    def decode(self, tokens: list[int], positions: list[int], lora_slots: list[int], slots: list[int],
               tables: list[list[int]], projections: frozenset[str], fed: torch.Tensor | None = None) -> torch.Tensor:
        """Same contract as the eager pass of single tokens: row i writes cache slot slots[i] and attends through
        tables[i]; `projections` is what the rows' adapters target -> logits [len(tokens), vocab].
        fed: the rows' input tokens [len(tokens)] still on the device (what the pass before sampled), in
        place of `tokens`, so this pass can be launched before the host has seen them."""
        used = len(tokens)
        rows = next(b for b in self.row_buckets if b >= used)
        width = next(b for b in self.block_buckets if b >= max(len(t) for t in tables))
        pad = [0] * (rows - used)
        (host, host_tables), copied = self._host[self._turn], self._copied[self._turn]
        self._turn ^= 1
        copied.synchronize()     # this buffer's copy two passes ago (long done when the engine runs it)
        host[:, :rows] = torch.tensor([tokens + pad, positions + pad, lora_slots + pad, slots + pad])
        host_tables[:rows, :width] = torch.tensor([t + [0] * (width - len(t)) for t in tables] + [[0] * width] * len(pad),
                                                  dtype=torch.int32)
        self._inputs[:, :rows].copy_(host[:, :rows], non_blocking=True)
        self.tables[:rows, :width].copy_(host_tables[:rows, :width], non_blocking=True)
        copied.record()
        if fed is not None:
            self._inputs[0, :used].copy_(fed)
        key = (rows, width, next(s for s in _LORA_SETS if projections <= s))
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._graphs[key] = self._capture(*key)
        graph[0].replay()
        # The graph's own output, overwritten by its next replay: sampling reads it first, in stream order.
        return graph[1][:used]

    def capture_all(self) -> int:
        """Captures every (rows, blocks, LoRA projections) bucket now; returns how many."""
        for key in itertools.product(self.row_buckets, self.block_buckets, _LORA_SETS):
            if key not in self._graphs:
                self._graphs[key] = self._capture(*key)
        return len(self._graphs)

    def _forward(self, rows: int, width: int, projections: frozenset[str]) -> torch.Tensor:
        lora = LoraBatch(self.lora_slots[:rows], self.max_lora_rank, projections, None)
        batch = self.model.batch(self.positions[:rows], self.slots[:rows], self.tables[:rows, :width], rows, (), lora,
                                 self.cache.block_size)
        return self.model(self.tokens[:rows], batch, self.cache)

    def _capture(self, rows: int, width: int,
                 projections: frozenset[str]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):   # the real step, twice: lazy initialisation stays out of the graph
                self._forward(rows, width, projections)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._forward(rows, width, projections)
        return graph, logits
