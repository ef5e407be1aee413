"""Scale-out on Ray Serve: N replicas, each one Cartridge engine, with adapter affinity
(started by `cartridge serve-ray`, server/ray/cli.py).

`CartridgeReplica` wraps one engine (build_core: one GPU, or the CPU). Adapters come from storage
every replica reads: the versioned store (--store; `legal` is its live version, `legal@v3` that
version, and each replica follows the releases of the names it holds, as `cartridge serve --store`
does, server/engine/store_follower.py), or the directories under --adapter-root, named by their directory.
Ray's `@serve.multiplexed`, with the adapter name as model id, routes a request to a replica that
already holds its adapter and keeps at most --max-adapters of them per replica (its LRU decides
which). Ray's LRU counts nothing in flight, so an adapter it evicts stays registered until the last
request using it on that replica has finished; a release switches a name for new requests while
running ones finish on their version.

Requests reach a replica through `Ingress` (server/ray/ingress.py), by their adapter as the multiplexed model
id, and leave it as `Started` and the engine's events: which replica served and whether the adapter was already
there ("hit") or had to be loaded ("miss"), the stored version that answered. Ratings and metrics pages are
asked of one replica by its id (`ReplicaRouter`, server/ray/replica_router.py). No `@serve.batch`: the
engine batches mixed adapters itself.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from ray import serve
from ray.serve.config import RequestRouterConfig

from ..edge.http_app import VERSION_HEADER
from .ingress import Ingress
from .replica_ids import check_replica
from .replica_router import ReplicaRouter

APP_NAME = "cartridge"


@dataclass(frozen=True, slots=True)
class Started:
    """A replica's first answer to a request, before its events."""
    prompt_tokens: int
    replica: str
    cache: str               # "hit": the adapter was on this replica already; "miss": loaded for it; "" = base
    version: str = ""        # name@vN: the stored version that answers (its canary's, when the split sent it there)


class ResidentAdapter:
    """What Ray's multiplex cache holds for one adapter on one replica.

    Ray calls __del__ when its LRU evicts the adapter, whatever still runs on it; the name leaves
    this replica's registry only when that has happened and no request holds it."""

    def __init__(self, name: str, drop):
        self.name, self._drop = name, drop
        self._users, self._evicted, self._lock = 0, False, threading.Lock()

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def done(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._evicted and self._users == 0
        if last:
            self._drop(self)

    def __del__(self) -> None:
        # Ray calls this on eviction, and Python calls it again at collection: drop only once.
        with self._lock:
            first, self._evicted = not self._evicted, True
            idle = self._users == 0
        if first and idle:
            self._drop(self)


# Ray's router with one addition: a rating or a metrics page can be asked of one replica by its id.
@serve.deployment(name="CartridgeReplica",
                  request_router_config=RequestRouterConfig(request_router_class=ReplicaRouter))
class CartridgeReplica:
    def __init__(self, config):
        from ..app import build_core
        from ..edge.http_app import EngineBackend

        # The engine's and the store's log lines (releases followed), as `cartridge serve` prints them.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.core = build_core(config, store_on_demand=True)
        self.backend = EngineBackend(self.core.engine, self.core.validator, self.core.registry, self.core.gate,
                                     self.core.base_name)
        self.root = Path(config.adapter_root) if config.adapter_root else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._resident: dict[str, ResidentAdapter] = {}

        # The decorator takes its limit when applied, so it is applied here, where the config is known.
        async def load(name: str) -> ResidentAdapter:
            await asyncio.to_thread(self._serve, name)
            self._resident[name] = ResidentAdapter(name, self._drop)
            return self._resident[name]
        self._load = serve.multiplexed(max_num_models_per_replica=config.max_adapters)(load)

    def _serve(self, name: str) -> None:
        if self.core.store is not None:
            self.core.store.serve(name)
            return
        _, replaced = self.core.registry.register(name, str(self.root / name), True)
        if replaced is not None:
            self.core.engine.discard(replaced)

    def _drop(self, adapter: ResidentAdapter) -> None:
        # A later load of the same name made a new ResidentAdapter: that one owns the name now.
        if self._resident.get(adapter.name) is not adapter:
            return
        del self._resident[adapter.name]
        if self.core.store is not None:
            self.core.store.drop(adapter.name)
            return
        self.core.engine.discard(self.core.registry.unregister(adapter.name))

    def feedback(self, request_id: str, score: float, tag: str, replica: str) -> str:
        """A rating of an answer this replica gave; `replica`: the replica the call is meant for (replica_router.py)."""
        check_replica(replica, self.replica)
        return self.core.metrics.feedback.rate(request_id, score, tag)

    def metrics_page(self, replica: str) -> str:
        from prometheus_client import generate_latest

        check_replica(replica, self.replica)
        return generate_latest(self.core.metrics.registry).decode()

    async def generate(self, request) -> AsyncIterator[Started | object]:
        """Started, then the engine's events, the last with the outcome. `request` is a GenerateRequest
        whose adapter is the multiplexed model id the ingress routed it by."""
        started, events = await self._start(request)
        yield started
        async for event in events:
            yield event

    async def _start(self, request) -> tuple[Started, AsyncIterator]:
        from ..lora.registry import check_name

        if not request.adapter:
            generation = await self.backend.generate(request)
            return Started(generation.prompt_tokens, self.replica, ""), generation.events
        if self.core.store is None:
            check_name(request.adapter, request.adapter_field)  # before it becomes a path under --adapter-root
        cache = "hit" if request.adapter in self._resident else "miss"
        adapter = await self._load(request.adapter)
        adapter.acquire()
        try:
            generation = await self.backend.generate(request)
        except BaseException:
            adapter.done()
            raise
        return (Started(generation.prompt_tokens, self.replica, cache, generation.headers.get(VERSION_HEADER, "")),
                _holding(generation.events, adapter))


async def _holding(events: AsyncIterator, adapter: ResidentAdapter) -> AsyncIterator:
    try:
        async for event in events:
            yield event
    finally:
        adapter.done()


def build_app(config, replicas: int, cpus_per_replica: float, gpus_per_replica: float):
    """The Ray Serve application: Ingress in front of `replicas` CartridgeReplicas, serving the adapters of
    `config.store` or of `config.adapter_root` (exactly one; absolute paths, as every Ray worker sees them)."""
    from adapters.formats.base_checkpoint import resolve_base

    if (config.store is None) == (config.adapter_root is None):
        raise ValueError("give the replicas one place to read adapters from: a store, or an adapter root")
    # Ray's default of 5 requests in flight per replica would cap an engine below its batch, and the one
    # Ingress replica would cap the whole application at 5: a replica takes what its engine decodes at
    # once (beyond that Ray queues, and may route to another replica), the Ingress all the replicas can hold.
    engines = CartridgeReplica.options(num_replicas=replicas, max_ongoing_requests=config.max_batch_size,
                                       ray_actor_options={"num_cpus": cpus_per_replica,
                                                          "num_gpus": gpus_per_replica}).bind(config)
    base_name = resolve_base(config.base_model).name
    return Ingress.options(max_ongoing_requests=replicas * (config.max_batch_size + config.max_queue),
                           ray_actor_options={"num_cpus": 0}).bind(engines, base_name, config.adapter_root,
                                                                   config.store)
