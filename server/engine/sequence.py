"""One generation request as the engine sees it, from arrival to its last event."""
from __future__ import annotations

import enum
import itertools
import queue
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..lora.registry import RegisteredAdapter
from ..errors import ServingError
from .text_stream import TextStream

if TYPE_CHECKING:
    from .block_pool import BlockTable
    from .grammar import GrammarState
    from .shadow import ShadowPair


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
    prompt_logprobs: bool = False       # each prompt token's logprob after the first, from the prefill pass
    # server/engine/penalties.py: 0, 0, 1 and no bias change nothing.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()     # (token id, bias)

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability and the likeliest alternatives, as (token id, text, logprob); text is
    the token decoded alone. logprob None: a prompt's first token, which nothing predicts."""
    token: int
    text: str
    logprob: float | None
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """What a request's caller receives: a new piece of text, and on the last event the outcome."""
    text: str
    finish_reason: FinishReason | None = None
    completion_tokens: int = 0
    error: ServingError | None = None     # set when the server ended the request with an error status
    logprobs: tuple[TokenLogprob, ...] = ()   # the tokens generated since the previous event, if asked for
    index: int = 0                            # the choice it belongs to (n > 1)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()   # on a choice's first event, if asked for: every prompt token


_ids = itertools.count()


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: RegisteredAdapter | None
    text: TextStream
    canary: bool = False      # sent to its name's canary version by the split (serve --store)
    shadow: bool = False      # a copy run on its name's shadow version, whose answer nobody receives
    pair: ShadowPair | None = None    # a live row with a shadow copy, and that copy, share one
    # The id callers give feedback with (GenerateResponse.request_id, the OpenAI response's id).
    request_id: str = field(default_factory=new_request_id)
    id: int = field(default_factory=lambda: next(_ids))
    output_ids: list[int] = field(default_factory=list)
    blocks: BlockTable | None = None      # its KV-cache blocks while admitted
    computed: int = 0                     # leading tokens whose keys and values are in those blocks
    lora_slot: int = 0
    penalty_row: int = 0                  # its row of the penalty tables (penalties.py) while admitted
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_reason: FinishReason | None = None
    cancelled: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    grammar: GrammarState | None = None   # structured output: the row's matcher and next-token bitmask
    logprobs: list[TokenLogprob] = field(default_factory=list)   # not yet sent in an event
    index: int = 0                        # which choice of its request (n > 1)
    # Choices 1..n-1 of a request with n > 1, on choice 0 alone: queued right after it, sharing its event
    # sink, and admitted once its prompt is computed with its prompt's blocks (Scheduler._fork), not again.
    forks: list[Sequence] = field(default_factory=list)
    source: Sequence | None = None        # on those choices: choice 0
    # From the passes over the prompt, until the first event takes them (a fork gets choice 0's).
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None

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
    admitted: bool = False                # its request was admitted for this pass: its penalty row starts afresh
    copy: tuple[int, int] | None = None   # a fork's (source, destination) block, copied before the pass

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def samples(self) -> bool:
        """Whether the pass gives this request its next token: its last known token is in it (a chained
        pass's token is still on the device, so it runs one past what the host knows)."""
        return self.end >= self.seq.num_tokens
