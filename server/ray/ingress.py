"""The Ray application's front: Ray's proxies send every request to `Ingress`, HTTP (the OpenAI app, the same
as `cartridge serve`'s) and gRPC (our Inference service), and it hands each to an engine replica
(server/ray/app.py) chosen by its adapter as the multiplexed model id.

A rating goes to the replica that gave the answer, named in the answer's id (replica_ids.py); /metrics
is every replica's page, each series labelled by its replica (replica_metrics.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import AsyncIterator

from ray import serve

from adapters.formats.store_layout import StoreReader, read_live
from cartridge.v1 import inference_pb2

from ..edge.grpc_answers import StreamAnswer, answer
from ..edge.grpc_service import from_proto, tool_mode
from ..edge.http_app import VERSION_HEADER
from ..engine.feedback import check_rating
from ..engine.sequence import new_request_id
from ..errors import InvalidArgument, NotFound, ServingError, Unavailable, serving_error, status_of
from .replica_ids import REPLICA_ARG, WrongReplica, answer_id, running_replicas, split_answer_id
from .replica_metrics import merged_page

REPLICA_CALL_S = 30.0   # a rating or a metrics page waits this long for its replica, behind the requests it runs


class RayBackend:
    """The HTTP app's backend in Ray: each request goes to a replica chosen by its adapter."""

    def __init__(self, replicas, base_name: str, adapter_root: str | None, store: str | None):
        # options() starts the handle's router now: the replicas are known (running_replicas) before any request.
        self.replicas, self.base_name = replicas.options(), base_name
        self.root = Path(adapter_root) if adapter_root else None
        self.store = StoreReader(Path(store)) if store else None
        self.app = serve.get_replica_context().app_name

    @property
    def draining(self) -> bool:
        return False    # Ray's proxies stop routing to a replica that is going away

    def authorize(self, method: str, authorization: str | None) -> None:
        """Open: put access control in front of Ray's proxies (an authenticating gateway)."""

    def adapters(self) -> list[str]:
        if self.store is not None:
            return [name for name in self.store.names() if read_live(self.store, name) is not None]
        return sorted(p.name for p in self.root.iterdir() if (p / "adapter_config.json").is_file())

    async def generate(self, request):
        from ..edge.http_app import Generation

        # The id is made here, so the answer's id can name it with the replica that answers.
        request = dataclasses.replace(request, request_id=request.request_id or new_request_id())
        stream = self.replicas.options(multiplexed_model_id=request.adapter, stream=True).generate.remote(request)
        started = await _unwrapped(stream.__anext__())
        headers = {"x-cartridge-replica": started.replica, "x-cartridge-adapter-cache": started.cache}
        if started.version:
            headers[VERSION_HEADER] = started.version
        return Generation(started.prompt_tokens, _events(stream), headers, answer_id(request.request_id,
                                                                                    started.replica))

    async def feedback(self, request_id: str, score: float, tag: str) -> str:
        check_rating(request_id, score, tag)
        on_replica, replica = split_answer_id(request_id)
        if replica not in running_replicas(self.app):
            raise NotFound(f"request {request_id!r} was answered by replica {replica}, which is no longer running: "
                           f"the record of which version gave its answers went with it", field="request_id")
        return await self._on(replica, "feedback", on_replica, score, tag)

    async def metrics_page(self) -> bytes:
        """Every engine replica's metrics, each series labelled by its replica."""
        replicas = sorted(running_replicas(self.app))
        pages = await asyncio.gather(*(self._on(replica, "metrics_page") for replica in replicas))
        return merged_page(dict(zip(replicas, pages)))

    async def _on(self, replica: str, method: str, *args):
        """`method` of the engine replica `replica` (of no other), waiting at most REPLICA_CALL_S for it."""
        deadline = time.monotonic() + REPLICA_CALL_S
        while True:
            call = getattr(self.replicas, method).remote(*args, **{REPLICA_ARG: replica})
            try:
                return await asyncio.wait_for(_unwrapped(call), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise Unavailable(f"replica {replica} did not take the call within {REPLICA_CALL_S:g} s") from None
            except WrongReplica:
                continue   # Ray's router handed it a replica chosen for another call (replica_router.py)


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
    def __init__(self, replicas, base_name: str, adapter_root: str | None, store: str | None):
        self.backend = RayBackend(replicas, base_name, adapter_root, store)

    def __serve_build_asgi_app__(self):
        from starlette.responses import Response
        from starlette.routing import Route

        from ..edge.http_app import openai_app

        async def metrics(_) -> Response:
            return Response(await self.backend.metrics_page(), media_type="text/plain; version=0.0.4")

        return openai_app(self.backend, extra_routes=[Route("/metrics", metrics)])

    async def Generate(self, request, grpc_context):
        try:
            generation, adapter = await self._start(request)
            pieces = [event async for event in generation.events]
        except ServingError as error:
            return _refuse(grpc_context, error, inference_pb2.GenerateResponse())
        grpc_context.set_trailing_metadata(list(generation.headers.items()))
        return answer(pieces, generation.prompt_tokens, adapter, generation.headers.get(VERSION_HEADER, ""),
                      tool_mode(request), generation.request_id)

    async def GenerateStream(self, request, grpc_context):
        try:
            generation, adapter = await self._start(request)
            grpc_context.set_trailing_metadata(list(generation.headers.items()))
            stream = StreamAnswer(generation.prompt_tokens, adapter, generation.headers.get(VERSION_HEADER, ""),
                                  tool_mode(request), generation.request_id)
            async for event in generation.events:
                yield stream.message(event)
        except ServingError as error:
            yield _refuse(grpc_context, error, inference_pb2.GenerateResponse())

    async def Feedback(self, request, grpc_context):
        try:
            version = await self.backend.feedback(request.request_id, request.score, request.tag)
        except ServingError as error:
            return _refuse(grpc_context, error, inference_pb2.FeedbackResponse())
        return inference_pb2.FeedbackResponse(adapter_version=version)

    async def _start(self, request):
        # Ray routes gRPC calls by the multiplexed_model_id metadata; the request may repeat it.
        routed = serve.get_multiplexed_model_id()
        if routed and request.adapter and routed != request.adapter:
            raise InvalidArgument(f"adapter {request.adapter!r} differs from the multiplexed_model_id "
                                  f"{routed!r} metadata", field="adapter")
        generate = dataclasses.replace(from_proto(request), adapter=request.adapter or routed)
        return await self.backend.generate(generate), generate.adapter


def _refuse(grpc_context, error: ServingError, empty):
    code, message = status_of(error)
    grpc_context.set_code(code)
    grpc_context.set_details(message)
    return empty
