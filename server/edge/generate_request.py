"""What either edge (gRPC, OpenAI HTTP) asks of the engine, checked once into a Sequence.

The edges only translate their wire format into a GenerateRequest; every rule about what a
request may ask (adapter, prompt, context room, sampling values, stop strings) lives here, so
both edges refuse the same things with the same words.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from adapters.formats.chat import render_prompt

from ..lora.registry import AdapterRegistry, RegisteredAdapter, check_name
from ..errors import InvalidArgument
from ..engine.sequence import SamplingParams, Sequence, new_request_id
from ..engine.shadow import shadow_copy
from ..engine.store_follower import StoreAdapters
from ..engine.text_stream import TextStream
from ..engine.grammar import Grammars, GrammarState, check_format

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 16
# Far above anything a context fits, so a huge request is refused in microseconds instead of costing memory.
MAX_REQUEST_BYTES = 2 * 2**20        # a gRPC message or HTTP body; larger is RESOURCE_EXHAUSTED / 413
MAX_PROMPT_CHARS = 262_144           # prompt, or all messages' content together
MAX_MESSAGES = 256
MAX_TOP_LOGPROBS = 20
MAX_ROUTING_KEY_CHARS = 256
ROLES = ("system", "user", "assistant")
# OpenAI's cap: past 2 the distribution is near uniform over the vocabulary and the text is noise.
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Unchecked values as an edge received them; zeros mean "unset", as in the proto."""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()     # (role, content)
    adapter: str = ""                              # empty: the base model alone
    max_tokens: int = 0                            # 0: DEFAULT_MAX_TOKENS or what the context has left
    temperature: float = 0.0
    top_p: float = 0.0                             # 0: 1 (no nucleus cut)
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter_field: str = "adapter"                 # how the edge names the adapter in its errors ("model")
    # Structured output (server/engine/grammar.py): type "text" (or "") is none; json_schema is JSON text.
    response_format: str = ""
    json_schema: str = ""
    regex: str = ""
    choice: tuple[str, ...] = ()
    logprobs: bool = False                         # each token's logprob ...
    top_logprobs: int = 0                          # ... and this many likeliest alternatives (0-20)
    routing_key: str = ""                          # keeps a caller on one side of a canary split; empty: random
    routing_key_field: str = "routing_key"         # its name on the edge ("user")
    request_id: str = ""                           # the edge's id for the answer; empty: a new one


class RequestValidator:
    def __init__(self, registry: AdapterRegistry, tokenizer, max_seq_len: int, store: StoreAdapters | None = None,
                 grammars: Grammars | None = None):
        self.registry, self.tokenizer, self.max_seq_len, self.store = registry, tokenizer, max_seq_len, store
        self.grammars = grammars

    def sequence(self, request: GenerateRequest, **fields) -> Sequence:
        """The request as the engine runs it; `fields` go to the Sequence (e.g. its event sink)."""
        request_id = request.request_id or new_request_id()
        adapter, canary = self._routed(request, request_id)
        prompt_ids = self._prompt_ids(request)
        room = self.max_seq_len - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens; this server's context holds "
                                  f"{self.max_seq_len} tokens with the answer", field="prompt")
        if request.max_tokens < 0:
            raise InvalidArgument(f"max_tokens must be at least 1, got {request.max_tokens}", field="max_tokens")
        max_tokens = request.max_tokens or min(DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise InvalidArgument(f"max_tokens {max_tokens} with a {len(prompt_ids)}-token prompt does not fit the "
                                  f"context of {self.max_seq_len} tokens; at most {room} fit", field="max_tokens")
        if request.top_k < 0:
            raise InvalidArgument(f"top_k must be 0 (off) or more, got {request.top_k}", field="top_k")
        params = SamplingParams(max_tokens=max_tokens, temperature=_temperature(request.temperature),
                                top_p=_top_p(request.top_p), top_k=request.top_k, seed=request.seed,
                                stop=_stop(request.stop), logprobs=_logprobs(request))
        grammar = self._grammar(request)
        seq = Sequence(prompt_ids, params, adapter, TextStream(self.tokenizer, params.stop), grammar=grammar,
                       canary=canary, request_id=request_id, **fields)
        # A shadow runs the live version's requests (not the canary's, nor pinned ones); a grammar's state is
        # one row's, so constrained requests are not shadowed.
        if self.store is not None and adapter is not None and adapter.live and grammar is None:
            shadow = self.store.shadow(adapter.name, request.routing_key or request_id)
            if shadow is not None:
                shadow_copy(seq, shadow, TextStream(self.tokenizer, params.stop))
        return seq

    def _grammar(self, request: GenerateRequest) -> GrammarState | None:
        """The request's response format compiled here, on the caller's thread (cached by content)."""
        fmt = check_format(request.response_format or "text", request.json_schema, request.regex, request.choice)
        if fmt is None:
            return None
        if self.grammars is None:
            raise InvalidArgument("response_format is not available on this server", field="response_format")
        return self.grammars.matcher(self.grammars.compile(fmt))

    def _routed(self, request: GenerateRequest, request_id: str) -> tuple[RegisteredAdapter | None, bool]:
        """The adapter, and whether the name's canary split sent the request to the canary version."""
        if len(request.routing_key) > MAX_ROUTING_KEY_CHARS:
            raise InvalidArgument(f"{request.routing_key_field} must be at most {MAX_ROUTING_KEY_CHARS} characters",
                                  field=request.routing_key_field)
        adapter = self.adapter(request.adapter, request.adapter_field)
        if self.store is None or adapter is None or not adapter.live:
            return adapter, False
        # Without a key the request's own id decides: a fresh one each time, so the share holds, unstuck.
        canary = self.store.route(adapter.name, request.routing_key or request_id)
        return (canary, True) if canary is not None else (adapter, False)

    def adapter(self, name: str, field: str = "adapter") -> RegisteredAdapter | None:
        """`name`, or with a store `name@vN`, one stored version; empty: the base model."""
        if self.store is not None and "@" in name:
            return self.store.by_version(name)
        return self.registry.get(check_name(name, field)) if name else None

    def _prompt_ids(self, request: GenerateRequest) -> list[int]:
        if bool(request.prompt) == bool(request.messages):
            raise InvalidArgument("give exactly one of prompt and messages", field="prompt")
        if len(request.messages) > MAX_MESSAGES:
            raise InvalidArgument(f"messages has {len(request.messages)} entries; at most {MAX_MESSAGES}",
                                  field="messages")
        chars = len(request.prompt) + sum(len(content) for _, content in request.messages)
        if chars > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"the prompt is {chars} characters; at most {MAX_PROMPT_CHARS}", field="prompt")
        if request.prompt:
            return self.tokenizer.encode(request.prompt)
        for i, (role, _) in enumerate(request.messages):
            if role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role is {role!r}; expected one of {ROLES}",
                                      field=f"messages[{i}].role")
        try:
            return render_prompt(self.tokenizer, [{"role": r, "content": c} for r, c in request.messages])
        except Exception as err:  # noqa: BLE001 - a chat template is the model's own Jinja code and raises what it likes
            raise InvalidArgument(f"messages: {err}", field="messages") from None


def _logprobs(request: GenerateRequest) -> int | None:
    if not 0 <= request.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {request.top_logprobs}",
                              field="top_logprobs")
    if request.top_logprobs and not request.logprobs:
        raise InvalidArgument("top_logprobs needs logprobs: true", field="top_logprobs")
    return request.top_logprobs if request.logprobs else None


def _temperature(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > MAX_TEMPERATURE:
        raise InvalidArgument(f"temperature must be between 0 (greedy) and {MAX_TEMPERATURE:g}, got {value:g}",
                              field="temperature")
    return value


def _top_p(value: float) -> float:
    if not math.isfinite(value) or value < 0 or value > 1:
        raise InvalidArgument(f"top_p must be between 0 and 1 (0 means 1), got {value}", field="top_p")
    return value or 1.0


def _stop(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(values)} strings; at most {MAX_STOP_STRINGS}", field="stop")
    for i, value in enumerate(values):
        if not value or len(value) > 256:
            raise InvalidArgument(f"stop[{i}] must be 1 to 256 characters", field="stop")
    return tuple(values)
