"""The OpenAI-compatible HTTP edge: a Starlette app over a Backend, served by uvicorn on its own thread.

The app knows nothing of where generation happens. `EngineBackend` is this process's engine (what
`cartridge serve --http-port` runs); the Ray Serve ingress (server/ray/ingress.py) gives the same app a
backend that reaches engine replicas instead, so both speak exactly the same API.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Protocol, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from adapters.formats.adapter_dir import AdapterFormatError

from ..lora.registry import AdapterRegistry
from ..engine.engine import Engine
from ..errors import InvalidArgument, RequestTooLarge, ServingError, http_error_of
from .call_gate import CallGate
from .generate_request import MAX_REQUEST_BYTES, GenerateRequest, RequestValidator
from .openai_api import OpenAIRequest, parse, parse_feedback
from .openai_responses import ResponseWriter
from ..engine.sequence import Event, Sequence

log = logging.getLogger(__name__)
VERSION_HEADER = "x-cartridge-adapter-version"   # name@vN: the stored version that answered (serve --store)


@dataclass(frozen=True, slots=True)
class Generation:
    """A started request: its prompt's size, then its events, the last one with the outcome."""
    prompt_tokens: int
    events: AsyncIterator[Event]
    headers: dict[str, str]      # extra response headers: the store version that answered (VERSION_HEADER),
                                 # and in Ray which replica served
    request_id: str = ""         # the id the answer carries, when the backend makes it (Ray: it names the
                                 # replica that answered, where a rating of the answer must go); "": the edge's


class Backend(Protocol):
    base_name: str

    @property
    def draining(self) -> bool: ...

    def authorize(self, method: str, authorization: str | None) -> None:
        """Raises the refusal when the Authorization header does not open `method`."""

    def adapters(self) -> list[str]: ...

    async def generate(self, request: GenerateRequest) -> Generation:
        """Checks and queues the request: a refusal raises here, before any event."""

    async def feedback(self, request_id: str, score: float, tag: str) -> str:
        """Counts a rating for the version that answered `request_id`; returns it as name@vN."""


class LoopEvents:
    """A Sequence's event sink that wakes an asyncio loop: the engine thread puts, a coroutine awaits."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:    # the HTTP server has shut its loop: nobody is left to read this
            pass

    async def get(self) -> Event:
        return await self._queue.get()


class EngineBackend:
    """This process's engine, through the same validation, tokens and drain as the gRPC edge."""

    def __init__(self, engine: Engine, validator: RequestValidator, registry: AdapterRegistry, gate: CallGate,
                 base_name: str):
        self.engine, self.validator, self.registry, self.gate = engine, validator, registry, gate
        self.base_name = base_name

    @property
    def draining(self) -> bool:
        return self.gate.draining

    def authorize(self, method: str, authorization: str | None) -> None:
        refusal = self.gate.check_token(method, authorization)
        if refusal is not None:
            raise refusal

    def adapters(self) -> list[str]:
        return [a.name for a in self.registry.list()]

    async def generate(self, request: GenerateRequest) -> Generation:
        events = LoopEvents(asyncio.get_running_loop())
        seq = self.validator.sequence(request, events=events)
        self.gate.admit()          # counted in, so a drain waits for it as for a gRPC call
        try:
            self.engine.submit(seq)
        except BaseException:
            self.gate.leave()
            raise
        return Generation(len(seq.prompt_ids), self._events(seq, events),
                          {VERSION_HEADER: seq.adapter_version} if seq.adapter_version else {})

    async def feedback(self, request_id: str, score: float, tag: str) -> str:
        return self.engine.metrics.feedback.rate(request_id, score, tag)

    async def _events(self, seq: Sequence, events: LoopEvents) -> AsyncIterator[Event]:
        """The events of every choice of the request, until each has ended."""
        running = 1 + len(seq.forks)
        try:
            while running:
                event = await events.get()
                if event.error:
                    raise event.error
                yield event
                running -= event.finish_reason is not None
        finally:
            # A caller that went away (or a failed stream) frees the slots at the engine's next step.
            if running:
                self.engine.cancel(seq)
            self.gate.leave()


def openai_app(backend: Backend, metrics: CollectorRegistry | None = None,
               extra_routes: Sequence[Route] = ()) -> Starlette:
    """`metrics`: also serve them at /metrics, the path and port an endpoint picker scrapes by default;
    `extra_routes`: a backend's own (Ray's /metrics, gathered from its replicas)."""
    async def health(_: Request) -> Response:
        if backend.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(request: Request) -> Response:
        backend.authorize("GET /v1/models", request.headers.get("authorization"))
        base = {"id": backend.base_name, "object": "model", "created": 0, "owned_by": "cartridge", "parent": None}
        adapters = [{"id": name, "object": "model", "created": 0, "owned_by": "cartridge",
                     "parent": backend.base_name} for name in backend.adapters()]
        return JSONResponse({"object": "list", "data": [base, *adapters]})

    async def chat(request: Request) -> Response:
        return await _complete(backend, request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(backend, request, chat=False)

    async def feedback(request: Request) -> Response:
        backend.authorize("POST /v1/feedback", request.headers.get("authorization"))
        rating = parse_feedback(await _json_body(request))
        version = await backend.feedback(rating["id"], rating["score"], rating["tag"])
        return JSONResponse({"id": rating["id"], "adapter_version": version})

    async def prometheus(_: Request) -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    routes = [Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/feedback", feedback, methods=["POST"])]
    if metrics is not None:
        routes.append(Route("/metrics", prometheus))
    routes.extend(extra_routes)
    return Starlette(routes=routes,
                     # ServingError and format errors are answered quietly; anything else is a bug, logged.
                     exception_handlers={ServingError: _error_response, AdapterFormatError: _error_response,
                                         Exception: _error_response})


async def _error_response(_: Request, error: Exception) -> Response:
    status, body = http_error_of(error)
    if status == 500:
        log.error("HTTP request failed", exc_info=error)
    return JSONResponse(body, status_code=status)


async def _complete(backend: Backend, http: Request, chat: bool) -> Response:
    backend.authorize(f"POST {http.url.path}", http.headers.get("authorization"))
    request = parse(await _json_body(http), chat, backend.base_name)
    writer = ResponseWriter(request)
    # The response's id is the request's: what POST /v1/feedback is given back.
    generation = await backend.generate(dataclasses.replace(request.generate, request_id=writer.id))
    writer.id = generation.request_id or writer.id
    if request.stream:
        return StreamingResponse(_sse(writer, request, generation), media_type="text/event-stream",
                                 headers=generation.headers)
    # Nothing reads a unary call's connection while it runs: watch it, so a caller that gives up
    # (a client timeout) cancels the request, as a closed stream does.
    collecting = asyncio.ensure_future(_collect(generation.events))
    gone = asyncio.ensure_future(_disconnected(http))
    await asyncio.wait((collecting, gone), return_when=asyncio.FIRST_COMPLETED)
    if not collecting.done():
        collecting.cancel()
        return Response(status_code=499)    # nginx's "client closed request": nobody reads it
    gone.cancel()
    return JSONResponse(writer.response(collecting.result(), generation.prompt_tokens), headers=generation.headers)


async def _json_body(http: Request) -> object:
    """The parsed body, read no further than MAX_REQUEST_BYTES: the same bound as a gRPC message."""
    too_large = RequestTooLarge(f"the request body is over {MAX_REQUEST_BYTES} bytes, this server's limit")
    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise too_large
    body = bytearray()
    async for chunk in http.stream():
        body += chunk
        if len(body) > MAX_REQUEST_BYTES:
            raise too_large
    try:
        return json.loads(body)
    except ValueError:
        raise InvalidArgument("the request body is not valid JSON") from None


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in events]


async def _disconnected(http: Request) -> None:
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _sse(writer: ResponseWriter, request: OpenAIRequest, generation: Generation) -> AsyncIterator[bytes]:
    completion_tokens = 0
    try:
        async for event in generation.events:
            for chunk in writer.chunks(event):
                yield _data(chunk)
            if event.finish_reason is not None:
                completion_tokens += event.completion_tokens
        if request.include_usage:
            yield _data(writer.usage_chunk(generation.prompt_tokens, completion_tokens))
    except Exception as error:  # noqa: BLE001 - headers are sent: the error goes in the stream, as OpenAI does
        yield _data(http_error_of(error)[1])
    yield b"data: [DONE]\n\n"


def _data(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


class HttpServer:
    """uvicorn on a thread of its own, with its own event loop; the socket listens before it starts.
    With a certificate it serves HTTPS, as gRPC serves TLS with the same one."""

    def __init__(self, app: Starlette, host: str, port: int, tls_cert: str | None = None,
                 tls_key: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((host, port))
        # Listening now, not when uvicorn's thread gets to it: the ready line is printed before that
        # thread runs, and a client that connects at once would be refused.
        self._socket.listen(2048)
        self.port = self._socket.getsockname()[1]
        self.scheme = "https" if tls_cert else "http"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                     timeout_graceful_shutdown=5, ssl_certfile=tls_cert,
                                                     ssl_keyfile=tls_key))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()
        self._socket.close()
