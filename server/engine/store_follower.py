"""`cartridge serve --store DIR`: every name's live version served under the name, any version on
request as `name@vN`, and releases and rollbacks followed while serving.

A thread polls each followed name's live pointer (a small file replaced by rename) every POLL_S
seconds. When it moves, the new version is read into host memory and checked (its manifest's hashes,
then the server's own adapter checks), then copied into an idle device slot when one can be had,
through the engine thread (waiting at most WARM_WAIT_S), so its first request pays nothing; only then
does the name switch to it.
Requests already running finish on the version they started with. If anything fails the old version
keeps serving and the failure is logged and counted.

A canary in the live pointer (`release --canary`) is followed the same way: its version is read and
warmed as `name@vN`, and from then `route` sends the share of the name's requests whose routing key
`routes_to_canary` picks to it; a canary that fails to load takes no requests. A canary with abort limits
is judged by a CanaryGuard (canary_guard.py), which moves the pointer back when one is crossed.

`cartridge serve` follows every name in the store, and on start the same path restores every live
version, so a restart, after kill -9 too, serves what the store says is live. A Ray replica
(server/ray/app.py) follows only the names Ray routes to it (`serve`), until Ray's LRU lets them go (`drop`).
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout

from adapters.formats.store_layout import (LiveMove, StoreError, StoreReader, VersionRef, live_file, log_file,
                                           parse_ref, read_live, release_log, routes_to_canary, split_mode)

from ..lora.registry import AdapterRegistry, RegisteredAdapter
from .canary_guard import CHECK_S, CanaryGuard
from .engine import Engine
from ..errors import FailedPrecondition, NotFound
from .metrics import ServerMetrics

log = logging.getLogger("cartridge.store")

POLL_S = 0.2  # a release reaches the server within this plus the read, well under a second
# The engine thread copies between steps, and runs queued copies before it schedules any request, so
# even past this wait the copy comes before the new version's first request. Waiting longer only tells
# sooner that a copy failed; under 16 CPU streams a step took 0.6 s, which would push a release past 1 s.
WARM_WAIT_S = 0.3


class StoreAdapters:
    def __init__(self, store: StoreReader, registry: AdapterRegistry, engine: Engine, metrics: ServerMetrics,
                 *, on_demand: bool = False, canary_check_s: float = CHECK_S):
        """`on_demand`: follow only the names asked for through `serve` (a Ray replica), not the whole store;
        `canary_check_s`: how often a canary's abort limits are checked."""
        self.store, self.registry, self.engine, self.metrics = store, registry, engine, metrics
        self.guard = CanaryGuard(store, metrics, canary_check_s, self._follow)
        self._followed: set[str] | None = set() if on_demand else None
        self._seen: dict[str, int] = {}          # name -> mtime_ns of the live pointer last acted on
        self._logged: dict[str, int] = {}        # name -> release-log lines already counted
        self._log_sizes: dict[str, int] = {}     # name -> bytes of the release log when last read
        # name -> (version, share, "canary" or "shadow") of its split, once the version is loaded
        self._canaries: dict[str, tuple[int, int, str]] = {}
        self._read_lock = threading.Lock()       # one read per name@vN
        self._names_lock = threading.Lock()      # guards _followed
        self._name_locks: dict[str, threading.Lock] = {}   # per name: one switch at a time, never beside a drop
        self._thread = threading.Thread(target=self._watch, name="store-watch", daemon=True)

    def start(self) -> None:
        """Serves every live version now (before the server says it is ready), then follows the pointers."""
        for name in self._names():
            self._begin(name, "restored at start-up")
        self._thread.start()
        self.guard.start()

    def versions(self, name: str) -> list[int]:
        return self.store.version_numbers(name)

    def serve(self, text: str) -> RegisteredAdapter:
        """`name`: its live version, followed from now on; `name@vN`: that version. NotFound when neither is there."""
        ref = self._parse(text)
        if ref.number is not None:
            return self.by_version(text)
        if self._followed is not None:
            with self._names_lock:
                self._followed.add(ref.name)
            self._begin(ref.name, "loaded for this replica's first request")
        try:
            return self.registry.get(ref.name)
        except NotFound:
            self.drop(ref.name)
        live = read_live(self.store, ref.name)
        if live is not None:   # the switch logged and counted why
            raise FailedPrecondition(f"adapter {ref.name!r}: its live version v{live.to_version} failed to load "
                                     f"from the store {self.store.root}; see the server's log")
        raise NotFound(f"adapter {ref.name!r} has no live version in the store {self.store.root} "
                       f"(versions: {', '.join(f'v{n}' for n in self.versions(ref.name)) or 'none'}); "
                       f"release one first")

    def drop(self, text: str) -> None:
        """Stops serving `text` (name or name@vN): requests running on it finish, new ones get NOT_FOUND."""
        with self._lock_of(text):
            if self._followed is not None:
                with self._names_lock:
                    self._followed.discard(text)
            self._seen.pop(text, None)
            self._logged.pop(text, None)
            self._log_sizes.pop(text, None)
            self._end_split(text)
            try:
                adapter = self.registry.unregister(text)
            except NotFound:
                return
            if adapter.live:
                self.metrics.live_version.remove(text)
        self.engine.discard(adapter)

    def by_version(self, text: str) -> RegisteredAdapter:
        """The adapter for a request naming `name@vN`, read and checked on first use, then kept."""
        ref = self._parse(text)
        with self._read_lock:  # one read per version, however many requests ask for it at once
            try:
                return self.registry.get(str(ref))
            except NotFound:
                version = self.store.open(ref)
                adapter = self.registry.read(str(ref), str(version.path), version=ref.number)
                log.info("serving %s on request", ref)
                return self.registry.install(adapter, replace=True)[0]

    def route(self, name: str, key: str) -> RegisteredAdapter | None:
        """The canary version for a request for live `name` with routing `key`, when the split sends it
        there; None: the live version serves it."""
        return self._split_version(name, key, "canary")

    def shadow(self, name: str, key: str) -> RegisteredAdapter | None:
        """The shadow version that also runs a request for live `name` with routing `key`; None: none does."""
        return self._split_version(name, key, "shadow")

    def _split_version(self, name: str, key: str, mode: str) -> RegisteredAdapter | None:
        split = self._canaries.get(name)
        if split is None or split[2] != mode or not routes_to_canary(name, split[0], split[1], key):
            return None
        return self.by_version(f"{name}@v{split[0]}")

    @staticmethod
    def _parse(text: str) -> VersionRef:
        try:
            return parse_ref(text)
        except StoreError as err:
            raise NotFound(f"adapter: {err}") from None

    def _names(self) -> list[str]:
        if self._followed is None:
            return self.store.names()
        with self._names_lock:
            return sorted(self._followed)

    def _lock_of(self, name: str) -> threading.Lock:
        # A drop runs on a Ray replica's event loop: it must not wait for another name's switch.
        return self._name_locks.setdefault(name, threading.Lock())

    def _begin(self, name: str, why: str) -> None:
        """Follows `name` from now on; the first time, `why` tells the log why its live version loads now."""
        first = name not in self._logged
        if first:
            self._logged[name] = len(release_log(self.store, name))   # moves before now are not this server's
        self._follow(name, why if first else None)

    def _watch(self) -> None:
        while True:
            time.sleep(POLL_S)
            for name in self._names():
                try:
                    self._follow(name)
                except Exception:  # noqa: BLE001 - a bad store entry must not stop the watcher
                    log.exception("following %s failed", name)

    def _follow(self, name: str, why: str | None = None) -> None:
        """Switches `name` to its live version if the pointer moved since last seen; `why`: the first load."""
        with self._lock_of(name):
            if self._followed is not None and name not in self._names():
                return   # dropped while the watcher was on its way
            try:
                stamp = live_file(self.store, name).stat().st_mtime_ns
            except FileNotFoundError:
                return
            if self._seen.get(name) == stamp:
                self._count_moves(name)   # a move's log line is appended just after its pointer lands
                return
            self._seen[name] = stamp
            move = read_live(self.store, name)
            self._switch(name, move, stamp, why)
            self._follow_canary(name, move)
            self._count_moves(name)

    def _follow_canary(self, name: str, move: LiveMove) -> None:
        """Starts, changes or ends `name`'s canary or shadow as the pointer says."""
        if move.canary is None:
            ended = self._end_split(name)
            if ended is not None:
                log.info("%s: %s ended (%s); the live version takes every request", name, ended, move.action)
            return
        split = (move.canary["version"], move.canary["share"], split_mode(move.canary))
        limits = move.canary.get("limits") if split[2] == "canary" else None
        if self._canaries.get(name) == split:
            self.guard.watch(name, move.to_version, split[0], limits)   # limits may change alone
            return
        ref = VersionRef(name, split[0])
        try:
            warm = self._warm(self.by_version(str(ref)))
        except Exception as err:  # noqa: BLE001 - the live version keeps every request
            self.metrics.store_load_failures.labels(name).inc()
            self._end_split(name)
            log.error("not starting the %s %s (the live version keeps every request): %s", split[2], ref, err)
            return
        if self._canaries.get(name, split)[2] != split[2]:
            self._end_split(name)
        self._canaries[name] = split
        self.guard.watch(name, move.to_version, split[0], limits)
        version, share = ((self.metrics.canary_version, self.metrics.canary_share) if split[2] == "canary" else
                          (self.metrics.shadow_version, self.metrics.shadow_share))
        version.labels(name).set(split[0])
        share.labels(name).set(split[1])
        what = "takes" if split[2] == "canary" else "also runs"
        log.info("%s: %s %s %s %d%% of requests (%s); %s", name, split[2], ref, what, split[1], move.action, warm)

    def _end_split(self, name: str) -> str | None:
        """Ends `name`'s canary or shadow on this server; returns which it was."""
        self.guard.forget(name)
        split = self._canaries.pop(name, None)
        if split is None:
            return None
        (self.metrics.forget_canary if split[2] == "canary" else self.metrics.forget_shadow)(name)
        return split[2]

    def _switch(self, name: str, move: LiveMove, stamp: int, why: str | None) -> None:
        try:
            current = self.registry.get(name)
        except NotFound:
            current = None
        if current is not None and current.version == move.to_version:
            return
        ref = VersionRef(name, move.to_version)
        try:
            version = self.store.open(ref)
            adapter = self.registry.read(name, str(version.path), version=ref.number, live=True)
            warm = self._warm(adapter)
        except Exception as err:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
            self.metrics.store_load_failures.labels(name).inc()
            kept = f"v{current.version}" if current is not None and current.version else "nothing"
            log.error("not switching %s to %s (%s keeps serving): %s", name, ref, kept, err)
            return
        _, replaced = self.registry.install(adapter, replace=True)
        if replaced is not None:
            self.engine.discard(replaced)
        self.metrics.live_version.labels(name).set(ref.number)
        if why is not None:
            # The pointer may have moved long before this server looked: the time since would read as a delay.
            log.info("%s: now serving %s (%s); %s", name, ref, why, warm)
        else:
            log.info("%s: now serving %s (%s), %.3f s after the pointer moved; %s", name, ref, move.action,
                     time.time() - stamp / 1e9, warm)

    def _warm(self, adapter: RegisteredAdapter) -> str:
        """Copies `adapter` into a device slot through the engine thread; says how far that got."""
        try:
            warmed = self.engine.warm(adapter).result(timeout=WARM_WAIT_S)
        except FutureTimeout:
            return "its copy into a device slot runs before the engine's next step"
        if warmed:
            return "in a device slot before the switch"
        return "not copied (no idle slot, or no host copy): its first request loads it"

    def _count_moves(self, name: str) -> None:
        """Counts the release log's new moves; the log is read only when it has grown."""
        try:
            size = log_file(self.store, name).stat().st_size
        except FileNotFoundError:
            return
        if self._log_sizes.get(name) == size:
            return
        self._log_sizes[name] = size
        moves = release_log(self.store, name)
        for move in moves[self._logged.get(name, 0):]:
            if move.moves_live:
                (self.metrics.rollbacks if move.action == "rollback" else self.metrics.releases).labels(name).inc()
        self._logged[name] = len(moves)
