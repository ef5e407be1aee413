"""The gRPC edge: checks each request once, into typed values, and hands it to the engine."""
from __future__ import annotations

from typing import Iterator

from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from ..lora.registry import AdapterRegistry, RegisteredAdapter, check_name
from ..engine.engine import Engine
from ..engine.feedback import FeedbackBook
from ..errors import InvalidArgument
from .generate_request import GenerateRequest, RequestValidator
from ..engine.sequence import Event, FinishReason, Sequence
from ..engine.store_follower import StoreAdapters

PIN_WAIT_S = 30.0   # how long RegisterAdapter waits for a device slot to pin into
# Bounds on what one call may make the server hold (README: Limits); prompt bounds are in generate_request.py.
MAX_PATH_CHARS = 4096
_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.END_OF_SEQUENCE: inference_pb2.FINISH_REASON_END_OF_SEQUENCE,
}


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine, validator: RequestValidator, feedback: FeedbackBook):
        self.engine, self.validator, self.feedback = engine, validator, feedback

    def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        seq = self._start(request, context)
        pieces, logprobs = [], []
        for event in self._events(seq):
            pieces.append(event.text)
            logprobs.extend(event.logprobs)
        return response_proto("".join(pieces), event, len(seq.prompt_ids), seq.answered_as,
                              seq.adapter_version, self._logprobs(logprobs), seq.request_id)

    def GenerateStream(self, request, context) -> Iterator[inference_pb2.GenerateResponse]:
        seq = self._start(request, context)
        for event in self._events(seq):
            if event.finish_reason is None:
                yield inference_pb2.GenerateResponse(text=event.text, logprobs=self._logprobs(event.logprobs))
            else:
                yield response_proto(event.text, event, len(seq.prompt_ids), seq.answered_as,
                                     seq.adapter_version, self._logprobs(event.logprobs), seq.request_id)

    def Feedback(self, request, context) -> inference_pb2.FeedbackResponse:
        version = self.feedback.rate(request.request_id, request.score, request.tag)
        return inference_pb2.FeedbackResponse(adapter_version=version)

    @staticmethod
    def _logprobs(logprobs) -> list[inference_pb2.TokenLogprob]:
        return [inference_pb2.TokenLogprob(
                    token_id=lp.token, token=lp.text, logprob=lp.logprob,
                    top_logprobs=[inference_pb2.TopLogprob(token_id=t, token=x, logprob=v) for t, x, v in lp.top])
                for lp in logprobs]

    def _start(self, request, context) -> Sequence:
        seq = self.validator.sequence(from_proto(request))
        self.engine.submit(seq)
        # Fires on cancellation and on an expired deadline: the slot is freed at the next step.
        context.add_callback(lambda: self.engine.cancel(seq))
        return seq

    @staticmethod
    def _events(seq: Sequence) -> Iterator[Event]:
        while True:
            event = seq.events.get()
            if event.error:
                raise event.error
            yield event
            if event.finish_reason is not None:
                return


def response_proto(text: str, last: Event, prompt_tokens: int, adapter: str, adapter_version: str = "",
                   logprobs: list | None = None, request_id: str = "") -> inference_pb2.GenerateResponse:
    """The answer (or a stream's last message) once `last` carries the outcome; a stream's other pieces
    are just their text (and logprobs)."""
    return inference_pb2.GenerateResponse(
        text=text, finish_reason=_FINISH.get(last.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
        prompt_tokens=prompt_tokens, completion_tokens=last.completion_tokens, adapter=adapter,
        adapter_version=adapter_version, logprobs=logprobs, request_id=request_id)


def from_proto(request: inference_pb2.GenerateRequest) -> GenerateRequest:
    fmt = request.response_format
    return GenerateRequest(
        prompt=request.prompt, messages=tuple((m.role, m.content) for m in request.messages),
        adapter=request.adapter, max_tokens=request.max_tokens, temperature=request.temperature,
        top_p=request.top_p, top_k=request.top_k, seed=request.seed if request.HasField("seed") else None,
        stop=tuple(request.stop), response_format=fmt.type, json_schema=fmt.json_schema, regex=fmt.regex,
        choice=tuple(fmt.choice), logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        routing_key=request.routing_key)


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
