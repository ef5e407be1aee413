"""Who runs next: a bounded FIFO queue, KV-cache slots and adapter slots.

Continuous batching: requests are admitted between forward passes whenever a cache slot is
free, and leave as soon as they finish, so a new request never waits for a batch to drain.
A request whose adapter cannot get a device slot yet waits without holding up those behind it.
"""
from __future__ import annotations

import heapq
import threading
from collections import deque
from typing import Callable

from ..lora.slots import AdapterSlots
from ..errors import InvalidArgument, ResourceExhausted
from .sequence import Sequence


class Scheduler:
    def __init__(self, num_kv_slots: int, max_queue: int, max_prefill_tokens: int, adapter_slots: AdapterSlots):
        self.max_queue, self.max_prefill_tokens = max_queue, max_prefill_tokens
        self.adapter_slots = adapter_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_kv_slots = num_kv_slots
        self._free_kv = list(range(num_kv_slots))   # a heap: lowest slot first keeps decode rows dense
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
        """Queues `seq` and its forks (n > 1), which are admitted with it."""
        if 1 + len(seq.forks) > self.num_kv_slots:
            raise InvalidArgument(f"n is {1 + len(seq.forks)}; this server runs at most {self.num_kv_slots} "
                                  f"sequences at once", field="n")
        with self._lock:
            if len(self.waiting) >= self.max_queue:
                raise ResourceExhausted(f"the server's queue is full ({self.max_queue} requests waiting); retry later")
            self.waiting.append(seq)

    def needs_room(self) -> bool:
        """Whether live rows wait for more KV slots than are free: shadow rows must give way then."""
        with self._lock:
            return sum(not s.shadow for s in self.waiting) > len(self._free_kv)

    def shadows_to_shed(self) -> list[Sequence]:
        """While live rows wait for more KV slots than are free: every waiting shadow row, and as many running
        ones as live rows lack slots (a shadow row never delays a live one by more than the step under way)."""
        with self._lock:
            short = sum(not s.shadow for s in self.waiting) - len(self._free_kv)
            if short <= 0:
                return []
            waiting = [s for s in self.waiting if s.shadow and not s.cancelled]
        return waiting + [s for s in self.running if s.shadow and not s.cancelled][:short]

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
        gone = [member for seq in gone for member in (seq, *seq.forks)]    # a request's choices end together
        running = [s for s in self.running if which(s)]
        for seq in running:
            self.finish(seq)
        return gone + running

    def schedule(self) -> list[Sequence]:
        """Admits waiting requests in arrival order while slots and the prefill budget allow; a request's
        forks come in with it, right after it, and cost a slot each but no prefill."""
        admitted: list[Sequence] = []
        prefilled: list[Sequence] = []
        with self._lock:
            for seq in list(self.waiting):
                if len(self._free_kv) < 1 + len(seq.forks):
                    break
                padded = max(len(s.prompt_ids) for s in (*prefilled, seq)) * (len(prefilled) + 1)
                if prefilled and padded > self.max_prefill_tokens:
                    break
                if not self.adapter_slots.can_acquire(seq.adapter):
                    continue
                self.waiting.remove(seq)
                for member in (seq, *seq.forks):
                    member.kv_slot = heapq.heappop(self._free_kv)
                    member.lora_slot = self.adapter_slots.acquire(seq.adapter)
                prefilled.append(seq)
                admitted.extend((seq, *seq.forks))
        self.running.extend(admitted)
        return admitted

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        heapq.heappush(self._free_kv, seq.kv_slot)
        self.adapter_slots.free(seq.lora_slot)
