"""What a GenerateResponse carries, as plain frozen dataclasses; converted from the proto here alone."""
from __future__ import annotations

from dataclasses import dataclass

from cartridge.v1 import inference_pb2

FINISH_REASONS = {
    inference_pb2.FINISH_REASON_UNSPECIFIED: None,
    inference_pb2.FINISH_REASON_LENGTH: "length",
    inference_pb2.FINISH_REASON_STOP: "stop",
    inference_pb2.FINISH_REASON_END_OF_SEQUENCE: "end_of_sequence",
    inference_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


@dataclass(frozen=True, slots=True)
class TopLogprob:
    """One of the likeliest tokens at a position."""
    token_id: int
    token: str          # the token decoded alone
    logprob: float


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token of the answer (or the prompt) with its log-probability and the likeliest alternatives, most
    likely first; logprob is None for a prompt's first token, which nothing predicts."""
    token_id: int
    token: str
    logprob: float | None
    top_logprobs: tuple[TopLogprob, ...] = ()

    @classmethod
    def from_proto(cls, entry: inference_pb2.TokenLogprob) -> "TokenLogprob":
        return cls(entry.token_id, entry.token, entry.logprob if entry.HasField("logprob") else None,
                   tuple(TopLogprob(t.token_id, t.token, t.logprob) for t in entry.top_logprobs))


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the answer made: its arguments are JSON text, as the model wrote them."""
    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a request's answers (n of them)."""
    index: int
    text: str
    finish_reason: str | None
    completion_tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True, slots=True)
class Completion:
    """Generate's answer, or one GenerateStream piece (finish_reason None until a choice's last).
    text, finish_reason, logprobs and tool_calls are choice 0's (a stream piece's: its choice's);
    completion_tokens counts every choice. `choices` holds every choice of a whole answer, one when n is 1,
    and is empty on stream pieces."""
    text: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    adapter: str
    adapter_version: str = ""    # name@vN: the stored version that answered (serve --store)
    request_id: str = ""         # what `feedback` rates (on the last piece of a stream)
    logprobs: tuple[TokenLogprob, ...] = ()          # with logprobs: one per generated token
    prompt_logprobs: tuple[TokenLogprob, ...] = ()   # with prompt_logprobs (a stream: a choice's first piece)
    tool_calls: tuple[ToolCall, ...] = ()            # with tools (a stream: a choice's last piece)
    choices: tuple[Choice, ...] = ()
    choice_index: int = 0        # the choice a stream piece belongs to

    @classmethod
    def from_proto(cls, message: inference_pb2.GenerateResponse, streamed: bool = False) -> "Completion":
        logprobs, tool_calls = _logprobs(message.logprobs), _tool_calls(message.tool_calls)
        finish_reason = FINISH_REASONS[message.finish_reason]
        choices = tuple(Choice(c.index, c.text, FINISH_REASONS[c.finish_reason], c.completion_tokens,
                               _logprobs(c.logprobs), _tool_calls(c.tool_calls)) for c in message.choices)
        if not choices and not streamed:   # the server lists choices only for n > 1
            choices = (Choice(0, message.text, finish_reason, message.completion_tokens, logprobs, tool_calls),)
        return cls(message.text, finish_reason, message.prompt_tokens, message.completion_tokens, message.adapter,
                   message.adapter_version, message.request_id, logprobs, _logprobs(message.prompt_logprobs),
                   tool_calls, choices, message.choice_index)


def _logprobs(entries) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob.from_proto(entry) for entry in entries)


def _tool_calls(calls) -> tuple[ToolCall, ...]:
    return tuple(ToolCall(c.id, c.name, c.arguments_json) for c in calls)
