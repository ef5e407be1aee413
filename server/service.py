"""The gRPC edge: checks each request once, into typed values, and hands it to the engine."""
from __future__ import annotations

import math
from typing import Iterator

from adapters.formats.chat import render_prompt
from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from .adapter_registry import AdapterRegistry, RegisteredAdapter, check_name
from .engine import Engine
from .errors import InvalidArgument, ServingError
from .metrics import ServerMetrics
from .sequence import Event, FinishReason, SamplingParams, Sequence
from .store_adapters import StoreAdapters
from .text_stream import TextStream

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
PIN_WAIT_S = 30.0   # how long RegisterAdapter waits for a device slot to pin into
# Bounds on what one request may make the server hold or tokenize, far above anything a context fits,
# so a huge request is refused in microseconds instead of costing memory (README: Limits).
MAX_REQUEST_BYTES = 2 * 2**20        # gRPC refuses larger messages with RESOURCE_EXHAUSTED
MAX_PROMPT_CHARS = 262_144           # prompt, or all messages' content together
MAX_MESSAGES = 256
MAX_PATH_CHARS = 4096
_ROLES = ("system", "user", "assistant")
_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.END_OF_SEQUENCE: inference_pb2.FINISH_REASON_END_OF_SEQUENCE,
}


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, engine: Engine, registry: AdapterRegistry, tokenizer, max_seq_len: int,
                 store: StoreAdapters | None = None):
        self.engine, self.registry, self.tokenizer, self.max_seq_len = engine, registry, tokenizer, max_seq_len
        self.store = store

    def Generate(self, request, context) -> inference_pb2.GenerateResponse:
        seq = self._start(request, context)
        pieces = []
        for event in self._events(seq):
            pieces.append(event.text)
        return self._response(seq, "".join(pieces), event)

    def GenerateStream(self, request, context) -> Iterator[inference_pb2.GenerateResponse]:
        seq = self._start(request, context)
        for event in self._events(seq):
            if event.finish_reason is None:
                yield inference_pb2.GenerateResponse(text=event.text)
            else:
                yield self._response(seq, event.text, event)

    def _start(self, request, context) -> Sequence:
        seq = self._sequence(request)
        if seq.adapter is not None:
            self.registry.hold(seq.adapter)      # released by the engine when the request ends
        try:
            self.engine.submit(seq)
        except ServingError:
            if seq.adapter is not None:
                self.registry.release(seq.adapter)
            raise
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

    @staticmethod
    def _response(seq: Sequence, text: str, last: Event) -> inference_pb2.GenerateResponse:
        return inference_pb2.GenerateResponse(
            text=text, finish_reason=_FINISH.get(last.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
            prompt_tokens=len(seq.prompt_ids), completion_tokens=last.completion_tokens, adapter=seq.adapter_name)

    def _sequence(self, request) -> Sequence:
        adapter = self._adapter(request.adapter)
        prompt_ids = self._prompt_ids(request)
        room = self.max_seq_len - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens; this server's context holds "
                                  f"{self.max_seq_len} tokens with the answer")
        max_tokens = request.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise InvalidArgument(f"max_tokens {max_tokens} with a {len(prompt_ids)}-token prompt does not fit the "
                                  f"context of {self.max_seq_len} tokens; at most {room} fit")
        params = SamplingParams(max_tokens=max_tokens, temperature=_temperature(request.temperature),
                                top_p=_top_p(request.top_p), top_k=request.top_k,
                                seed=request.seed if request.HasField("seed") else None, stop=_stop(request.stop))
        return Sequence(prompt_ids, params, adapter, TextStream(self.tokenizer, params.stop))

    def _adapter(self, name: str) -> RegisteredAdapter | None:
        if self.store is not None and "@" in name:
            return self.store.by_version(name)
        return self.registry.get(check_name(name, "adapter")) if name else None

    def _prompt_ids(self, request) -> list[int]:
        if bool(request.prompt) == bool(request.messages):
            raise InvalidArgument("give exactly one of prompt and messages")
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidArgument(f"messages has {len(request.messages)} entries; at most {MAX_MESSAGES}")
        chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
        if chars > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the prompt is {chars} characters; at most {MAX_PROMPT_CHARS}")
        if request.prompt:
            return self.tokenizer.encode(request.prompt)
        for i, message in enumerate(request.messages):
            if message.role not in _ROLES:
                raise InvalidArgument(f"messages[{i}].role is {message.role!r}; expected one of {_ROLES}")
        try:
            return render_prompt(self.tokenizer, [{"role": m.role, "content": m.content} for m in request.messages])
        except Exception as err:  # noqa: BLE001 - a chat template is the model's own Jinja code and raises what it likes
            raise InvalidArgument(f"messages: {err}") from None


def _temperature(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > 100:
        raise InvalidArgument(f"temperature must be between 0 (greedy) and 100, got {value}")
    return value


def _top_p(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > 1:
        raise InvalidArgument(f"top_p must be between 0 and 1 (0 means 1), got {value}")
    return value or 1.0


def _stop(values) -> tuple[str, ...]:
    if len(values) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(values)} strings; at most {MAX_STOP_STRINGS}")
    for i, value in enumerate(values):
        if not value or len(value) > 256:
            raise InvalidArgument(f"stop[{i}] must be 1 to 256 characters")
    return tuple(values)


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, registry: AdapterRegistry, engine: Engine, metrics: ServerMetrics,
                 store: StoreAdapters | None = None):
        self.registry, self.engine, self.metrics, self.store = registry, engine, metrics, store

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
        self.metrics.forget_adapter(name)
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
            problem=adapter.problem or "", version=adapter.version or 0, live=adapter.live)
