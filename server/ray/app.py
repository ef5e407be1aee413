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

Requests come in through Ray's proxies to `Ingress`, two ways: gRPC with our own proto (the adapter
in the `multiplexed_model_id` metadata and/or the request), and the OpenAI HTTP API (`model` in the
body). Ingress hands each to a replica chosen by its adapter as the multiplexed model id. Each answer says which replica served it and whether the adapter was already there ("hit") or had
to be loaded ("miss"): HTTP headers x-cartridge-replica / x-cartridge-adapter-cache, gRPC trailing
metadata of the same names. No `@serve.batch`: the engine batches mixed adapters itself.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from ray import serve

from adapters.formats.store_layout import StoreReader, read_live
from cartridge.v1 import inference_pb2

from ..errors import FailedPrecondition, InvalidArgument, ServingError, serving_error, status_of
from ..edge.grpc_answers import StreamAnswer, answer
from ..edge.grpc_service import from_proto, tool_mode
from ..edge.http_app import VERSION_HEADER

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


@serve.deployment(name="CartridgeReplica")
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


class RayBackend:
    """The HTTP app's backend in Ray: each request goes to a replica chosen by its adapter."""

    def __init__(self, replicas, base_name: str, adapter_root: str | None, store: str | None):
        self.replicas, self.base_name = replicas, base_name
        self.root = Path(adapter_root) if adapter_root else None
        self.store = StoreReader(Path(store)) if store else None

    @property
    def draining(self) -> bool:
        return False    # Ray's proxies stop routing to a replica that is going away

    def authorize(self, method: str, authorization: str | None) -> None:
        """Open: put access control in front of Ray's proxies (an authenticating gateway)."""

    def adapters(self) -> list[str]:
        if self.store is not None:
            return [name for name in self.store.names() if read_live(self.store, name) is not None]
        return sorted(p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file())

    def feedback(self, request_id: str, score: float, tag: str) -> str:
        # The ingress does not know which replica answered a request, and each replica keeps its own book.
        raise FailedPrecondition("feedback is counted by `cartridge serve`; under serve-ray it is not available")

    async def generate(self, request):
        from ..edge.http_app import Generation

        stream = self.replicas.options(multiplexed_model_id=request.adapter, stream=True).generate.remote(request)
        started = await _unwrapped(stream.__anext__())
        headers = {"x-cartridge-replica": started.replica, "x-cartridge-adapter-cache": started.cache}
        if started.version:
            headers[VERSION_HEADER] = started.version
        return Generation(started.prompt_tokens, _events(stream), headers)


async def _events(stream) -> AsyncIterator:
    while True:
        try:
            yield await _unwrapped(stream.__anext__())
        except StopAsyncIteration:
            return


async def _unwrapped(pending):
    """A replica's own error (its status and words) rather than Ray's wrapper around it."""
    from ray.exceptions import RayTaskError

    try:
        return await pending
    except RayTaskError as error:
        if isinstance(error.cause, Exception):
            raise serving_error(error.cause) from None
        raise


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """The application's front: Ray's proxies send every request here, HTTP (the OpenAI app) and gRPC
    (our Inference service), and it routes each to a replica by its adapter."""

    def __init__(self, replicas, base_name: str, adapter_root: str | None, store: str | None):
        self.backend = RayBackend(replicas, base_name, adapter_root, store)

    def __serve_build_asgi_app__(self):
        from ..edge.http_app import openai_app

        return openai_app(self.backend)

    async def Generate(self, request, grpc_context):
        try:
            generation, adapter = await self._start(request)
            pieces = [event async for event in generation.events]
        except ServingError as error:
            return _refuse(grpc_context, error)
        grpc_context.set_trailing_metadata(list(generation.headers.items()))
        return answer(pieces, generation.prompt_tokens, adapter, generation.headers.get(VERSION_HEADER, ""),
                      tool_mode(request))

    async def GenerateStream(self, request, grpc_context):
        try:
            generation, adapter = await self._start(request)
            grpc_context.set_trailing_metadata(list(generation.headers.items()))
            stream = StreamAnswer(generation.prompt_tokens, adapter, generation.headers.get(VERSION_HEADER, ""),
                                  tool_mode(request))
            async for event in generation.events:
                yield stream.message(event)
        except ServingError as error:
            yield _refuse(grpc_context, error)

    async def _start(self, request):
        # Ray routes gRPC calls by the multiplexed_model_id metadata; the request may repeat it.
        routed = serve.get_multiplexed_model_id()
        if routed and request.adapter and routed != request.adapter:
            raise InvalidArgument(f"adapter {request.adapter!r} differs from the multiplexed_model_id "
                                  f"{routed!r} metadata", field="adapter")
        generate = dataclasses.replace(from_proto(request), adapter=request.adapter or routed)
        return await self.backend.generate(generate), generate.adapter


def _refuse(grpc_context, error: ServingError) -> inference_pb2.GenerateResponse:
    code, message = status_of(error)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return inference_pb2.GenerateResponse()


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
