"""Work on the adapter device slots asked for from other threads (pin, warm, discard), queued here and run
by the engine thread between passes, the only thread that touches the slots."""
from __future__ import annotations

import logging
import queue
from concurrent.futures import Future
from typing import Callable

from ..errors import ServingError
from ..lora.registry import AdapterRegistry, RegisteredAdapter
from ..lora.slots import AdapterSlots

log = logging.getLogger(__name__)


class AdapterJobs:
    def __init__(self, registry: AdapterRegistry, slots: AdapterSlots, wake: Callable[[], None]):
        self.registry, self.slots, self._wake = registry, slots, wake
        # A job returns False to run again at the next step (it waits for a running request to free a slot).
        self._jobs: queue.SimpleQueue[Callable[[], bool]] = queue.SimpleQueue()

    def pin(self, adapter: RegisteredAdapter) -> Future:
        """Resolves once `adapter` holds a device slot for good (at once, or when a running request frees one)."""
        done: Future = Future()

        def job() -> bool:
            if self.registry.is_current(adapter):   # not replaced or unregistered while it waited
                try:
                    self.registry.hold(adapter)      # its weights stay on the host while they are copied
                except ServingError as err:
                    done.set_exception(err)
                    return True
                try:
                    if not self.slots.pin(adapter):
                        return False
                finally:
                    self.registry.drop_hold(adapter)
            done.set_result(None)
            return True
        self._put(job)
        return done

    def warm(self, adapter: RegisteredAdapter) -> Future:
        """Resolves True once `adapter`, read but not yet visible to requests, sits in an idle device slot,
        so its first request copies nothing; False when running requests hold every slot."""
        done: Future = Future()

        def job() -> bool:
            try:
                # Under --max-host-adapter-bytes its host copy may be gone already: its first request reads it.
                if adapter.weights is not None and self.slots.can_acquire(adapter):
                    self.slots.free(self.slots.acquire(adapter))
                    done.set_result(True)
                else:
                    done.set_result(False)
            except Exception as err:  # noqa: BLE001 - the caller keeps the old version serving
                done.set_exception(err)
            return True
        self._put(job)
        return done

    def discard(self, adapter: RegisteredAdapter) -> None:
        """A replaced or unregistered version gives up its pin and, once idle, its slot."""
        self._put(lambda: self.slots.discard(adapter) or True)

    def _put(self, job: Callable[[], bool]) -> None:
        self._jobs.put(job)
        self._wake()

    def run(self) -> bool:
        """Runs queued jobs, on the engine thread; True if some must run again."""
        again = []
        while not self._jobs.empty():
            job = self._jobs.get()
            try:
                if not job():
                    again.append(job)
            except Exception:  # noqa: BLE001 - a failed job must not stop the engine
                log.exception("adapter slot job failed")
        for job in again:
            self._jobs.put(job)
        return bool(again)
