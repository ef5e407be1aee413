"""What either edge (gRPC, OpenAI HTTP) asks of the engine, checked once into a Sequence.

The edges only translate their wire format into a GenerateRequest; every rule about what a
request may ask (adapter, prompt, context room, sampling values, stop strings) lives here, so
both edges refuse the same things with the same words.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from adapters.formats.chat import render_prompt

from ..lora.registry import AdapterRegistry, RegisteredAdapter, check_name
from ..errors import InvalidArgument
from ..engine.sequence import Sequence, new_request_id
from ..engine.shadow import shadow_copy
from ..engine.store_follower import StoreAdapters
from ..engine.text_stream import TextStream
from ..engine.grammar import Grammars, ResponseFormat, check_format
from . import tools
from .sampling_fields import sampling_params
from .tools import Tool

DEFAULT_MAX_TOKENS = 256
MAX_CHOICES = 8                      # n: choices sharing one prefill
# Far above anything a context fits, so a huge request is refused in microseconds instead of costing memory.
MAX_REQUEST_BYTES = 2 * 2**20        # a gRPC message or HTTP body; larger is RESOURCE_EXHAUSTED / 413
MAX_PROMPT_CHARS = 262_144           # prompt, or all messages' content together
MAX_MESSAGES = 256
MAX_ROUTING_KEY_CHARS = 256
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """Unchecked values as an edge received them; zeros mean "unset", as in the proto."""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()     # (role, content)
    adapter: str = ""                              # empty: the base model alone
    # Unset (None, 0 or "" as noted) takes the adapter's default (cartridge.json), else the edge's.
    max_tokens: int = 0                            # 0: DEFAULT_MAX_TOKENS or what the context has left
    temperature: float | None = None               # None: fallback_temperature
    fallback_temperature: float = 0.0              # gRPC: greedy; OpenAI's HTTP: 1
    top_p: float = 0.0                             # 0: 1 (no nucleus cut)
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    adapter_field: str = "adapter"                 # how the edge names the adapter in its errors ("model")
    # Structured output (server/engine/grammar.py): type "text" is none, "" unset; json_schema is JSON text.
    response_format: str = ""
    json_schema: str = ""
    regex: str = ""
    choice: tuple[str, ...] = ()
    logprobs: bool = False                         # each token's logprob ...
    top_logprobs: int = 0                          # ... and this many likeliest alternatives (0-20)
    routing_key: str = ""                          # keeps a caller on one side of a canary split; empty: random
    routing_key_field: str = "routing_key"         # its name on the edge ("user")
    # Sampling controls (server/engine/penalties.py); None: unset (none); repetition_penalty 0: none (1).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    n: int = 0                                     # choices; 0: 1
    prompt_logprobs: bool = False                  # the prompt's tokens' logprobs too (completions' echo)
    tools: tuple[Tool, ...] = ()                   # functions the chat answer may call (server/edge/tools.py)
    tool_choice: str = ""                          # "none", "auto" (""), "required" or a function's name
    request_id: str = ""                           # the edge's id for the answer; empty: a new one


class RequestValidator:
    def __init__(self, registry: AdapterRegistry, tokenizer, max_seq_len: int, store: StoreAdapters | None = None,
                 grammars: Grammars | None = None, vocab_size: int | None = None):
        self.registry, self.tokenizer, self.max_seq_len, self.store = registry, tokenizer, max_seq_len, store
        self.grammars = grammars
        self.vocab_size = vocab_size or len(tokenizer)   # the model's logits may be wider than the tokenizer

    def sequence(self, request: GenerateRequest, **fields) -> Sequence:
        """The request as the engine runs it; `fields` go to the Sequence (e.g. its event sink). With n > 1
        it is choice 0, and `forks` holds the other choices, which share its prefill and its event sink."""
        request_id = request.request_id or new_request_id()
        adapter, canary = self._routed(request, request_id)
        asked = request.max_tokens
        if adapter is not None:
            request = with_defaults(request, adapter.defaults)
        prompt_ids = self._prompt_ids(request)
        room = self.max_seq_len - len(prompt_ids)
        if room <= 0:
            raise InvalidArgument(f"prompt is {len(prompt_ids)} tokens; this server's context holds "
                                  f"{self.max_seq_len} tokens with the answer", field="prompt")
        if asked < 0:
            raise InvalidArgument(f"max_tokens must be at least 1, got {asked}", field="max_tokens")
        # Unset: the adapter's default or ours, each cut to what the context has left.
        max_tokens = asked or min(request.max_tokens or DEFAULT_MAX_TOKENS, room)
        if max_tokens > room:
            raise InvalidArgument(f"max_tokens {max_tokens} with a {len(prompt_ids)}-token prompt does not fit the "
                                  f"context of {self.max_seq_len} tokens; at most {room} fit", field="max_tokens")
        if not 0 <= request.n <= MAX_CHOICES:
            raise InvalidArgument(f"n must be between 1 and {MAX_CHOICES}, got {request.n}", field="n")
        params = sampling_params(request, max_tokens, self.vocab_size)
        fmt = check_format(request.response_format or "text", request.json_schema, request.regex, request.choice)
        if tools.mode(request.tools, request.tool_choice) == "forced":
            if fmt is not None:
                raise InvalidArgument("response_format cannot be combined with a tool_choice that forces a call",
                                      field="tool_choice")
            fmt = tools.forced_format(request.tools, request.tool_choice)
        compiled = self._compiled(fmt)
        choices: list[Sequence] = []
        for i in range(request.n or 1):
            if choices:
                fields["events"] = choices[0].events     # one sink for every choice: events say their index
            choices.append(Sequence(prompt_ids, replace(params, seed=choice_seed(params.seed, i)), adapter,
                                    TextStream(self.tokenizer, params.stop), canary=canary, index=i,
                                    grammar=None if compiled is None else self.grammars.matcher(compiled),
                                    request_id=request_id, **fields))
        seq = choices[0]
        seq.forks = choices[1:]
        # A shadow runs the live version's requests (not the canary's, nor pinned ones); a grammar's state is
        # one row's, and choices share one prefill, so constrained and n > 1 requests are not shadowed.
        if self.store is not None and adapter is not None and adapter.live and compiled is None and not seq.forks:
            shadow = self.store.shadow(adapter.name, request.routing_key or request_id)
            if shadow is not None:
                shadow_copy(seq, shadow, TextStream(self.tokenizer, params.stop))
        return seq

    def _compiled(self, fmt: ResponseFormat | None):
        """The response format compiled here, on the caller's thread (cached by content); None: plain text."""
        if fmt is None:
            return None
        if self.grammars is None:
            raise InvalidArgument("response_format is not available on this server", field="response_format")
        return self.grammars.compile(fmt)

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
        tools.check_tools(request.tools, request.tool_choice)
        if request.prompt:
            if request.tools:
                raise InvalidArgument("tools need messages: the chat template renders them", field="tools")
            return self.tokenizer.encode(request.prompt)
        if request.tools and "tools" not in (self.tokenizer.chat_template or ""):
            raise InvalidArgument("the base model's chat template has no tool support, so tools cannot be offered "
                                  "to it; describe the functions in the messages instead", field="tools")
        for i, (role, _) in enumerate(request.messages):
            if role not in ROLES:
                raise InvalidArgument(f"messages[{i}].role is {role!r}; expected one of {ROLES}",
                                      field=f"messages[{i}].role")
        try:
            return render_prompt(self.tokenizer, [{"role": r, "content": c} for r, c in request.messages],
                                 tools.template_tools(request.tools) or None)
        except Exception as err:  # noqa: BLE001 - a chat template is the model's own Jinja code: it raises anything
            raise InvalidArgument(f"messages: {err}", field="messages") from None


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s seed: choice 0 keeps the request's (n=1 and n=4 begin alike), the others get one
    derived from it, so the choices differ and each is reproducible. None (no seed): each draws freshly."""
    if seed is None or index == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"{seed}/{index}".encode()).digest()[:8], "little")


# A field is unset at these values; the adapter's default then applies.
_UNSET = {"max_tokens": 0, "temperature": None, "top_p": 0.0, "presence_penalty": None, "frequency_penalty": None,
          "repetition_penalty": None, "response_format": ""}


def with_defaults(request: GenerateRequest, defaults: dict) -> GenerateRequest:
    """`request` with an adapter's defaults (GenerateRequest fields) in the fields it left unset; the
    response format's fields go together, with response_format."""
    fields = {k: v for k, v in defaults.items() if k in _UNSET and getattr(request, k) == _UNSET[k]}
    if tools.mode(request.tools, request.tool_choice) == "forced":
        fields.pop("response_format", None)       # a forced call's grammar is the answer's format
    if "response_format" in fields:
        fields.update({k: defaults.get(k, GenerateRequest.__dataclass_fields__[k].default)
                       for k in ("json_schema", "regex", "choice")})
    return replace(request, **fields) if fields else request
