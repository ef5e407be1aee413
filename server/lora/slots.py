"""Which adapter sits in which device slot of the LoRA stacks (the S-LoRA/LoRAX cache idea).

Registered adapters wait in host memory; one is copied into a slot when a request for it is
admitted, and stays while it is used or until its slot is needed. An idle slot is reused least
recently used first; a pinned adapter keeps its slot for good. Only the engine thread changes
this, between forward passes.
"""
from __future__ import annotations

from collections import OrderedDict

from .registry import RegisteredAdapter
from .batch import LoraStack

BASE_SLOT = 0  # always zero weights: rows for the base model alone


class AdapterSlots:
    def __init__(self, stacks: dict[tuple[int, str], LoraStack], num_slots: int):
        self._stacks = stacks
        self._free = list(range(num_slots, 0, -1))                  # slot 0 is the base model's
        self._slot_of: dict[RegisteredAdapter, int] = {}
        self._adapter_in: dict[int, RegisteredAdapter] = {}
        self._users: dict[int, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()   # slots nobody uses, least recently used first
        self._pinned: set[RegisteredAdapter] = set()         # never idle, so never evicted
        self.ranks: dict[int, int] = {BASE_SLOT: 0}
        self.projections: dict[int, frozenset[str]] = {BASE_SLOT: frozenset()}

    @property
    def num_resident(self) -> int:
        return len(self._slot_of)

    def slot_of(self, adapter: RegisteredAdapter) -> int | None:
        """Where `adapter` sits now (any thread may ask; the answer may be a step old)."""
        return self._slot_of.get(adapter)

    def can_acquire(self, adapter: RegisteredAdapter | None) -> bool:
        return adapter is None or adapter in self._slot_of or bool(self._free or self._idle)

    def acquire(self, adapter: RegisteredAdapter | None) -> int:
        """The slot holding `adapter`, loading it first if needed. Call only after can_acquire."""
        if adapter is None:
            return BASE_SLOT
        slot = self._slot_of.get(adapter)
        if slot is None:
            slot = self._free.pop() if self._free else self._evict()
            try:
                self._load(slot, adapter)
            except BaseException:
                self._free.append(slot)   # a failed copy (the device out of memory) leaves the slot free, not lost
                raise
        self._idle.pop(slot, None)
        self._users[slot] = self._users.get(slot, 0) + 1
        return slot

    def free(self, slot: int) -> None:
        if slot == BASE_SLOT:
            return
        self._users[slot] -= 1
        if self._users[slot] == 0:
            del self._users[slot]
            if self._adapter_in[slot] not in self._pinned:
                self._idle[slot] = None

    def pin(self, adapter: RegisteredAdapter) -> bool:
        """Loads `adapter` into a slot it keeps for good; False while every slot is in use (try again)."""
        self._pinned.add(adapter)
        slot = self._slot_of.get(adapter)
        if slot is None:
            if not (self._free or self._idle):
                return False
            slot = self._free.pop() if self._free else self._evict()
            self._load(slot, adapter)
        self._idle.pop(slot, None)
        return True

    def discard(self, adapter: RegisteredAdapter) -> None:
        """A replaced or unregistered version: unpinned, and its slot freed unless a request still uses it."""
        self._pinned.discard(adapter)
        slot = self._slot_of.get(adapter)
        if slot is None:
            return
        if slot in self._users:
            return   # free() makes it idle, and an idle slot is reused in time
        self._idle.pop(slot, None)
        del self._slot_of[adapter], self._adapter_in[slot]
        self._free.append(slot)

    def _evict(self) -> int:
        slot, _ = self._idle.popitem(last=False)
        del self._slot_of[self._adapter_in[slot]]
        return slot

    def _load(self, slot: int, adapter: RegisteredAdapter) -> None:
        weights = adapter.weights
        for key, stack in self._stacks.items():
            stack.load(slot, weights.a.get(key), weights.b.get(key))
        self._slot_of[adapter] = slot
        self._adapter_in[slot] = adapter
        self.ranks[slot] = adapter.rank
        self.projections[slot] = weights.targets
