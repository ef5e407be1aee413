"""One generation request as the engine sees it, from arrival to its last event."""
from __future__ import annotations

import enum
import itertools
import queue
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..lora.registry import RegisteredAdapter
from ..errors import ServingError
from .text_stream import TextStream

if TYPE_CHECKING:
    from .block_pool import BlockTable
    from .grammar import GrammarState


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    END_OF_SEQUENCE = "end_of_sequence"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Validated at the edge (generate_request.py); temperature 0 means greedy."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None         # None: none; n: each token's logprob and its n likeliest alternatives


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability and the likeliest alternatives, as (token id, text, logprob);
    text is the token decoded alone."""
    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """What a request's caller receives: a new piece of text, and on the last event the outcome."""
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    error: ServingError | None = None     # set when the server ended the request with an error status
    logprobs: tuple[TokenLogprob, ...] = ()   # the tokens generated since the previous event, if asked for


_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: RegisteredAdapter | None
    text: TextStream
    canary: bool = False      # sent to its name's canary version by the split (serve --store)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    blocks: BlockTable | None = None      # its KV-cache blocks while admitted
    computed: int = 0                     # leading tokens whose keys and values are in those blocks
    lora_slot: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    grammar: GrammarState | None = None   # structured output: the row's matcher and next-token bitmask
    logprobs: list[TokenLogprob] = field(default_factory=list)   # not yet sent in an event

    def __post_init__(self) -> None:
        # Each request draws from its own generator, so a seeded request samples the same
        # tokens whatever else shares its batch.
        self.rng = random.Random(self.params.seed)

    @property
    def adapter_name(self) -> str:
        return self.adapter.name if self.adapter else ""

    @property
    def answered_as(self) -> str:
        """The adapter as the caller named it: a canary's answer names the store name, not `name@vN`."""
        return self.adapter.store_name if self.canary else self.adapter_name

    @property
    def adapter_version(self) -> str:
        """`name@vN`, the store version that answered; empty for the base and adapters registered by path."""
        if self.adapter is None or self.adapter.version is None:
            return ""
        return f"{self.adapter.store_name}@v{self.adapter.version}"

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids [start, end) of the prompt followed by the output so far (a preempted request
        computes both again)."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return self.prompt_ids[start:end]
        return self.prompt_ids[start:] + self.output_ids[max(0, start - prompt):end - prompt]

    def cancel(self) -> None:
        """From any thread: the engine frees the slot at its next step."""
        self.cancelled = True


@dataclass(frozen=True, slots=True)
class Work:
    """One request's share of a forward pass: its tokens [start, end), whose keys and values the pass writes."""
    seq: Sequence
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        """Whether the pass gives this request its next token: its last known token is in it (a chained
        pass's token is still on the device, so it runs one past what the host knows)."""
        return self.end >= self.seq.num_tokens
