"""The gRPC edge: checks each request once, into typed values, and hands it to the engine."""
from __future__ import annotations

from typing import Iterator

from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from ..lora.registry import AdapterRegistry, RegisteredAdapter, check_name
from ..engine.engine import Engine
from ..engine.feedback import FeedbackBook
from ..errors import InvalidArgument
from .generate_request import GenerateRequest, RequestValidator
from ..engine.sequence import Event, Sequence
from . import tools
from .grpc_answers import StreamAnswer, answer
from .tools import Tool
from ..engine.store_follower import StoreAdapters

PIN_WAIT_S = 30.0   # how long RegisterAdapter waits for a device slot to pin into
# Bounds on what one call may make the server hold (README: Limits); prompt bounds are in generate_request.py.
MAX_PATH_CHARS = 4096


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine, validator: RequestValidator, feedback: FeedbackBook):
        self.engine, self.validator, self.feedback = engine, validator, feedback

    def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        seq = self._start(request, context)
        return answer(list(self._events(seq)), len(seq.prompt_ids), seq.answered_as, seq.adapter_version,
                      tool_mode(request), seq.request_id)

    def GenerateStream(self, request, context) -> Iterator[inference_pb2.GenerateResponse]:
        seq = self._start(request, context)
        stream = StreamAnswer(len(seq.prompt_ids), seq.answered_as, seq.adapter_version, tool_mode(request),
                              seq.request_id)
        for event in self._events(seq):
            yield stream.message(event)

    def Feedback(self, request, context) -> inference_pb2.FeedbackResponse:
        version = self.feedback.rate(request.request_id, request.score, request.tag)
        return inference_pb2.FeedbackResponse(adapter_version=version)

    def _start(self, request, context) -> Sequence:
        seq = self.validator.sequence(from_proto(request))
        self.engine.submit(seq)
        # Fires on cancellation and on an expired deadline: the slot is freed at the next step.
        context.add_callback(lambda: self.engine.cancel(seq))
        return seq

    @staticmethod
    def _events(seq: Sequence) -> Iterator[Event]:
        """The events of every choice of the request, until each has ended."""
        running = 1 + len(seq.forks)
        while running:
            event = seq.events.get()
            if event.error:
                raise event.error
            yield event
            running -= event.finish_reason is not None


def from_proto(request: inference_pb2.GenerateRequest) -> GenerateRequest:
    fmt = request.response_format
    return GenerateRequest(
        prompt=request.prompt, messages=tuple((m.role, m.content) for m in request.messages),
        adapter=request.adapter, max_tokens=request.max_tokens,
        temperature=request.temperature if request.HasField("temperature") else None,
        top_p=request.top_p, top_k=request.top_k, seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop), response_format=fmt.type, json_schema=fmt.json_schema, regex=fmt.regex,
        choice=tuple(fmt.choice), logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        routing_key=request.routing_key,
        **{name: getattr(request, name) if request.HasField(name) else None
           for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")},
        logit_bias=tuple(request.logit_bias.items()), n=request.n, prompt_logprobs=request.prompt_logprobs,
        tools=tuple(Tool(t.name, t.description, t.parameters_json) for t in request.tools),
        tool_choice=request.tool_choice)


def tool_mode(request: inference_pb2.GenerateRequest) -> str:
    """How the answers of a (checked) request are read for tool calls (server/edge/tools.py)."""
    return tools.mode(tuple(request.tools), request.tool_choice)


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, registry: AdapterRegistry, engine: Engine, store: StoreAdapters | None = None):
        self.registry, self.engine, self.store = registry, engine, store

    def RegisterAdapter(self, request, context) -> adapters_pb2.AdapterInfo:
        if len(request.path) > MAX_PATH_CHARS or "\0" in request.path:
            raise InvalidArgument(f"path must be at most {MAX_PATH_CHARS} characters, without NUL")
        adapter, replaced = self.registry.register(request.name, request.path, request.replace, request.pin)
        if replaced is not None:
            self.engine.discard(replaced)
        if adapter.pinned:
            try:
                self.engine.pin(adapter).result(timeout=PIN_WAIT_S)
            except TimeoutError:
                pass   # every slot is busy with running requests: it is pinned as soon as one is free
        return self.adapter_info(adapter)

    def UnregisterAdapter(self, request, context) -> adapters_pb2.UnregisterAdapterResponse:
        name = check_name(request.name)
        self.engine.discard(self.registry.unregister(name))
        return adapters_pb2.UnregisterAdapterResponse()

    def ListAdapters(self, request, context) -> adapters_pb2.ListAdaptersResponse:
        listed = [self.adapter_info(a) for a in self.registry.list()]
        if self.store is not None:
            for info in listed:
                if info.live:
                    info.store_versions.extend(self.store.versions(info.name))
        return adapters_pb2.ListAdaptersResponse(adapters=listed)

    def adapter_info(self, adapter: RegisteredAdapter) -> adapters_pb2.AdapterInfo:
        config = adapter.config
        slot = self.engine.scheduler.adapter_slots.slot_of(adapter)
        location = (adapters_pb2.ADAPTER_LOCATION_DEVICE if slot is not None else
                    adapters_pb2.ADAPTER_LOCATION_HOST if adapter.weights is not None else
                    adapters_pb2.ADAPTER_LOCATION_DISK)
        return adapters_pb2.AdapterInfo(
            name=adapter.name, path=adapter.path, rank=adapter.rank, lora_alpha=config.lora_alpha,
            use_rslora=config.use_rslora, target_modules=list(config.target_modules), size_bytes=adapter.size_bytes,
            location=location, device_slot=slot or 0, pinned=adapter.pinned, sha256=adapter.weights_sha256,
            problem=adapter.problem or "", version=adapter.version or 0, live=adapter.live,
            file_bytes=adapter.file_bytes)
