"""Who runs next, and on what share of the pass: a bounded FIFO queue, KV-cache blocks and adapter slots.

Continuous batching with chunked prefill (Sarathi-Serve's idea): a pass has a token budget. Running
requests that decode come first, one token each; requests still in their prompt take chunks of what is
left, and waiting ones are admitted into the rest while blocks are free. A long prompt then holds the
running streams for one pass's worth of tokens at most. A request leaves as soon as it finishes, so a
new one never waits for a batch to drain, and one whose adapter cannot get a device slot yet waits
without holding up those behind it.

When the blocks run out, the youngest request is preempted: its blocks go back (its full ones stay in
the prefix cache), and it waits at the head of the queue to be computed again, prompt and output so
far (vLLM's recompute). Its next token then comes from the same keys and values, so it finishes with
the tokens it would have produced, and a seeded request draws from its generator only when it samples.
Shadow rows go first: they are preempted before any live row, and shed while live rows wait for room.

A request's other choices (n > 1) wait right behind it until its prompt is computed; each then takes
the prompt's blocks (the full ones shared, the last copied) and computes only the prompt's last token.
"""
from __future__ import annotations

import heapq
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ResourceExhausted
from ..lora.slots import AdapterSlots
from .block_pool import BlockPool, BlockTable
from .prefix_cache import adapter_key
from .sequence import Sequence, Work


@dataclass(slots=True)
class Plan:
    """One pass's work, single tokens first, and what choosing it did."""
    work: list[Work] = field(default_factory=list)
    tokens: int = 0                                      # the pass's tokens: the sum of the work's lengths
    preempted: list[Sequence] = field(default_factory=list)
    cached_tokens: int = 0                               # tokens admitted requests found in the prefix cache
    looked_up_tokens: int = 0                            # tokens admitted requests looked up


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch_size: int, max_tokens_per_pass: int, max_queue: int,
                 adapter_slots: AdapterSlots):
        self.pool, self.max_batch_size, self.max_tokens_per_pass = pool, max_batch_size, max_tokens_per_pass
        self.max_queue, self.adapter_slots = max_queue, adapter_slots
        self._free_rows = list(range(max_batch_size))   # penalty rows (penalties.py): one per running request
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._lock = threading.Lock()                # add() comes from gRPC threads

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def adapter_names(self) -> tuple[str, str]:
        """Distinct adapters of running and of waiting requests, each sorted and comma-separated."""
        with self._lock:
            waiting = {s.adapter_name for s in self.waiting}
        running = {s.adapter_name for s in self.running}
        return ",".join(sorted(running - {""})), ",".join(sorted(waiting - {""}))

    def add(self, seq: Sequence) -> None:
        """Queues `seq` and, right behind it, its forks (n > 1), which need not run at the same time as it."""
        for fork in seq.forks:
            fork.source = seq
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise ResourceExhausted(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.extend((seq, *seq.forks))

    def needs_room(self) -> bool:
        """Whether a live request waits for KV-cache blocks or a row: shadow rows must give way then."""
        return self._shortfall() > 0

    def shadows_to_shed(self) -> list[Sequence]:
        """While a live request waits for room: every waiting shadow row, and running ones, youngest first,
        until their blocks and rows would make that room (a shadow row never delays a live one by more than
        the step under way)."""
        short = self._shortfall()
        if short <= 0:
            return []
        with self._lock:
            shed = [s for s in self.waiting if s.shadow and not s.cancelled]
        for seq in sorted((s for s in self.running if s.shadow and not s.cancelled), key=lambda s: -s.id):
            if short <= 0:
                break
            shed.append(seq)
            short -= max(len(seq.blocks.ids), 1)
        return shed

    def _shortfall(self) -> int:
        """Blocks (a row counting as one) the oldest waiting live request lacks to be admitted; 0 when none waits."""
        with self._lock:
            live = next((s for s in self.waiting if not s.shadow and s.source is None), None)
        if live is None:
            return 0
        if len(self.running) >= self.max_batch_size:
            return 1
        needed = -(-min(live.num_tokens, self.max_tokens_per_pass) // self.pool.block_size)
        return needed - (self.pool.num_free - len(self.running))

    def take_cancelled(self) -> list[Sequence]:
        """Cancelled requests, waiting or running, taken out of the schedule."""
        return self._take(lambda seq: seq.cancelled)

    def take_all(self) -> list[Sequence]:
        """Every request, waiting or running, taken out of the schedule."""
        return self._take(lambda seq: True)

    def _take(self, which: Callable[[Sequence], bool]) -> list[Sequence]:
        with self._lock:
            gone = [s for s in self.waiting if which(s)]
            for seq in gone:
                self.waiting.remove(seq)
        running = [s for s in self.running if which(s)]
        for seq in running:
            self.finish(seq)
        return gone + running

    def schedule(self) -> Plan:
        """This pass's work: decoding requests, then the next chunks of prompts, then admissions, within the
        token budget and --max-batch-size rows, oldest first; preempts the youngest while blocks lack."""
        plan = Plan()
        for seq in sorted(self.running, key=lambda s: (s.num_tokens - s.computed > 1, s.id)):
            if seq in plan.preempted:
                continue
            if plan.tokens >= self.max_tokens_per_pass or len(plan.work) >= self.max_batch_size:
                break
            length = self._fit(seq, min(seq.num_tokens - seq.computed, self.max_tokens_per_pass - plan.tokens), plan)
            if length:
                plan.work.append(Work(seq, seq.computed, seq.computed + length))
                plan.tokens += length
        self._admit(plan)
        plan.work.sort(key=lambda w: w.length > 1)
        return plan

    def chain(self, seqs: list[Sequence]) -> list[Work] | None:
        """The next pass of exactly `seqs`, one token each after the one a pass in flight computes, when they
        are all that runs, nobody waits and no block must be freed for it; None otherwise."""
        if self.waiting or len(seqs) != len(self.running) or set(seqs) != set(self.running):
            return None
        if not all(seq.blocks.grow(seq.computed + 1) for seq in seqs):
            return None
        return [Work(seq, seq.computed, seq.computed + 1) for seq in seqs]

    def advance(self, work: list[Work]) -> None:
        """After launching a pass: its tokens' keys and values are written, and full blocks become findable."""
        for w in work:
            w.seq.computed = w.end
            w.seq.blocks.publish(w.seq.tokens, min(w.end, w.seq.num_tokens))

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)

    def _fit(self, seq: Sequence, wanted: int, plan: Plan) -> int:
        """Grows `seq`'s blocks for up to `wanted` more tokens, preempting the youngest requests while none
        is free; returns how many fit (0 when `seq` itself was the youngest)."""
        while True:
            room = seq.blocks.capacity + self.pool.num_free * self.pool.block_size - seq.computed
            if room > 0:
                length = min(wanted, room)
                seq.blocks.grow(seq.computed + length)
                return length
            victim = max(self.running, key=lambda s: (s.shadow, s.id))     # shadow rows first
            self._preempt(victim, plan)
            if victim is seq:
                return 0

    def _preempt(self, seq: Sequence, plan: Plan) -> None:
        self.running.remove(seq)
        self._release(seq)
        for w in [w for w in plan.work if w.seq is seq]:
            plan.work.remove(w)
            plan.tokens -= w.length
        plan.preempted.append(seq)
        with self._lock:
            self.waiting.appendleft(seq)     # older than everything waiting: it goes first

    def _admit(self, plan: Plan) -> None:
        with self._lock:
            for seq in list(self.waiting):
                budget = self.max_tokens_per_pass - plan.tokens
                if budget <= 0 or len(plan.work) >= self.max_batch_size or not self._free_rows \
                        or seq in plan.preempted:
                    break
                source = None if seq.output_ids else seq.source     # a fork with tokens of its own runs alone
                if source is not None and (source in self.waiting or source.blocks is not None
                                           and source.computed < len(seq.prompt_ids) - 1):
                    continue        # a fork waits for its request's prompt
                if not self.adapter_slots.can_acquire(seq.adapter):
                    continue
                forked = source is not None and source.blocks is not None
                found = self._fork(seq, source) if forked else self._match(seq)
                if found is None:
                    break
                table, cached, copy = found
                length = min(seq.num_tokens - cached, budget)
                # A block per running request stays free, so those decoding rarely need a preemption.
                if table.blocks_for(cached + length) > self.pool.num_free - len(self.running):
                    table.release()
                    break
                table.grow(cached + length)
                self.waiting.remove(seq)
                seq.blocks, seq.computed = table, cached
                seq.lora_slot = self.adapter_slots.acquire(seq.adapter)
                seq.penalty_row = heapq.heappop(self._free_rows)
                self.running.append(seq)
                plan.work.append(Work(seq, cached, cached + length, admitted=True, copy=copy))
                plan.tokens += length
                if not forked:
                    plan.cached_tokens += cached
                    plan.looked_up_tokens += seq.num_tokens

    def _match(self, seq: Sequence) -> tuple[BlockTable, int, None]:
        """A table holding what the prefix cache has of `seq`'s tokens; none for a prompt whose logprobs are
        still to come, as skipped positions would give none."""
        table = BlockTable(self.pool, adapter_key(seq.adapter))
        if seq.params.prompt_logprobs and not seq.output_ids:
            return table, 0, None
        return table, table.match(seq.tokens, seq.num_tokens - 1), None    # the last token is computed to sample

    @staticmethod
    def _fork(seq: Sequence, source: Sequence) -> tuple[BlockTable, int, tuple[int, int] | None] | None:
        """A table sharing `source`'s blocks of the prompt but its last token, which `seq` computes itself to
        sample its first token; None when no block is free for the copy of the partial one."""
        forked = source.blocks.fork(len(seq.prompt_ids) - 1)
        if forked is None:
            return None
        table, copy = forked
        return table, len(seq.prompt_ids) - 1, copy

    def _release(self, seq: Sequence) -> None:
        seq.blocks.publish(seq.tokens, min(seq.computed, seq.num_tokens))
        seq.blocks.release()
        seq.blocks, seq.computed = None, 0
        self.adapter_slots.free(seq.lora_slot)
        heapq.heappush(self._free_rows, seq.penalty_row)
