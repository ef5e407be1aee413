"""`cartridge serve --store DIR`: every name's live version served under the name, any version on
request as `name@vN`, and releases and rollbacks followed while serving.

A thread polls each name's live pointer (a small file replaced by rename) every POLL_S seconds. When
it moves, the new version is read into host memory and checked (its manifest's hashes, then the
server's own adapter checks) before the name switches to it; requests already running finish on
the version they started with. Its device slot is filled by the first request that uses it. If anything fails the old version keeps
serving and the failure is logged and counted. On start the same path restores every live version,
so a restart, after kill -9 too, serves what the store says is live.
"""
from __future__ import annotations

import logging
import threading
import time

from adapters.store.live import live_file, read_live, release_log
from adapters.store.refs import StoreError, VersionRef, parse_ref
from adapters.store.versions import AdapterStore

from .adapter_registry import AdapterRegistry, RegisteredAdapter
from .engine import Engine
from .errors import NotFound
from .metrics import ServerMetrics

log = logging.getLogger("cartridge.store")

POLL_S = 0.2  # a release reaches the server within this plus the read, well under a second


class StoreAdapters:
    def __init__(self, store: AdapterStore, registry: AdapterRegistry, engine: Engine, metrics: ServerMetrics):
        self.store, self.registry, self.engine, self.metrics = store, registry, engine, metrics
        self._seen: dict[str, int] = {}          # name -> mtime_ns of the live pointer last acted on
        self._logged: dict[str, int] = {}        # name -> release-log lines already counted
        self._read_lock = threading.Lock()
        self._thread = threading.Thread(target=self._watch, name="store-watch", daemon=True)

    def start(self) -> None:
        """Serves every live version now (before the server says it is ready), then follows the pointers."""
        for name in self.store.names():
            self._logged[name] = len(release_log(self.store, name))
            self._follow(name)
        self._thread.start()

    def versions(self, name: str) -> list[int]:
        return self.store.version_numbers(name)

    def by_version(self, text: str) -> RegisteredAdapter:
        """The adapter for a request naming `name@vN`, read and checked on first use, then kept."""
        try:
            ref = parse_ref(text)
        except StoreError as err:
            raise NotFound(f"adapter: {err}") from None
        with self._read_lock:  # one read per version, however many requests ask for it at once
            try:
                return self.registry.get(str(ref))
            except NotFound:
                version = self.store.open(ref)
                adapter = self.registry.read(str(ref), str(version.path), version=ref.number)
                log.info("serving %s on request", ref)
                return self.registry.install(adapter, replace=True)[0]

    def _watch(self) -> None:
        while True:
            time.sleep(POLL_S)
            for name in self.store.names():
                try:
                    self._follow(name)
                except Exception:  # noqa: BLE001 - a bad store entry must not stop the watcher
                    log.exception("following %s failed", name)

    def _follow(self, name: str) -> None:
        try:
            stamp = live_file(self.store, name).stat().st_mtime_ns
        except FileNotFoundError:
            return
        if self._seen.get(name) == stamp:
            return
        self._seen[name] = stamp
        self._count_moves(name)
        move = read_live(self.store, name)
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
        except Exception as err:  # noqa: BLE001 - whatever went wrong, the old version keeps serving
            self.metrics.store_load_failures.labels(name).inc()
            kept = f"v{current.version}" if current is not None and current.version else "nothing"
            log.error("not switching %s to %s (%s keeps serving): %s", name, ref, kept, err)
            return
        _, replaced = self.registry.install(adapter, replace=True)
        if replaced is not None:
            self.engine.discard(replaced)
        self.metrics.live_version.labels(name).set(ref.number)
        log.info("%s: now serving %s (%s)", name, ref, move.action)

    def _count_moves(self, name: str) -> None:
        moves = release_log(self.store, name)
        for move in moves[self._logged.get(name, 0):]:
            (self.metrics.rollbacks if move.action == "rollback" else self.metrics.releases).labels(name).inc()
        self._logged[name] = len(moves)

