"""Automatic abort of a canary: every `check_s` seconds the canary's figures on this server, since this server
started it, are held against the live version's by the limits in its live-pointer entry (`release --canary
PCT --abort-...`). When one is crossed the pointer moves back, under the same compare-and-set as `cartridge
rollback`, and `releases.jsonl` records `canary aborted` with the numbers. Of several servers the first to
see a limit crossed moves it; the others find it moved and follow.

The figures are read from this server's own Prometheus registry through adapters/formats/version_stats.py,
the code `cartridge canary` prints them with, so a limit means the same in both.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import generate_latest

from adapters.formats.live_pointer import LiveMoved, move_live
from adapters.formats.store_layout import StoreReader
from adapters.formats.version_stats import CanaryLimits, VersionSample, read_samples

log = logging.getLogger("cartridge.store")

CHECK_S = 5.0


@dataclass(frozen=True, slots=True)
class Watched:
    live: int
    canary: int
    limits: CanaryLimits
    baseline: dict[str, VersionSample]     # the counters when this server started the canary


class CanaryGuard:
    def __init__(self, store: StoreReader, metrics, check_s: float, moved: Callable[[str], None]):
        """`moved(name)`: the follower applies the new pointer at once, not at its next poll."""
        self.store, self.metrics, self.check_s, self._moved = store, metrics, check_s, moved
        self._watched: dict[str, Watched] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="canary-guard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, name: str, live: int, canary: int, limits: dict | None) -> None:
        """Judges `name`'s canary from now on, if its entry has limits; the same canary keeps its baseline."""
        if not limits or not CanaryLimits(**limits).any:
            self.forget(name)
            return
        with self._lock:
            earlier = self._watched.get(name)
            same = earlier is not None and (earlier.live, earlier.canary) == (live, canary)
            self._watched[name] = Watched(live, canary, CanaryLimits(**limits),
                                          earlier.baseline if same else self._samples(name))

    def forget(self, name: str) -> None:
        with self._lock:
            self._watched.pop(name, None)

    def _samples(self, name: str) -> dict[str, VersionSample]:
        return read_samples([generate_latest(self.metrics.registry).decode()], name)[0]

    def _loop(self) -> None:
        while True:
            time.sleep(self.check_s)
            with self._lock:
                watched = dict(self._watched)
            for name, watch in watched.items():
                try:
                    self.check(name, watch)
                except Exception:  # noqa: BLE001 - one name's failure must not stop the others' checks
                    log.exception("checking the canary of %s failed", name)

    def check(self, name: str, watch: Watched) -> None:
        now = self._samples(name)
        empty = VersionSample()
        since = {label: now.get(label, empty).minus(watch.baseline.get(label, empty))
                 for label in (f"v{watch.live}", f"v{watch.canary}")}
        reason = watch.limits.tripped(since[f"v{watch.live}"], since[f"v{watch.canary}"])
        if reason is None:
            return
        try:
            move_live(self.store, name, expected=watch.live, to=watch.live, action="canary aborted",
                      gate_report_sha256=None, reason="a server's canary limits were crossed",
                      expected_canary=watch.canary, tripped=reason)
        except LiveMoved as err:   # another server, or a person, moved it first
            log.info("%s: not aborting the canary of v%d: %s", name, watch.canary, err)
        else:
            log.warning("%s: canary v%d aborted: %s", name, watch.canary, reason)
        self.forget(name)
        self._moved(name)
