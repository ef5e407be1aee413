"""Engine events into GenerateResponse messages: the gRPC edge's and the Ray ingress's one way to answer."""
from __future__ import annotations

from collections import defaultdict

from cartridge.v1 import inference_pb2

from ..engine.sequence import Event, FinishReason, TokenLogprob
from .tools import parse_tool_calls

_FINISH = {
    FinishReason.LENGTH: inference_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: inference_pb2.FINISH_REASON_STOP,
    FinishReason.END_OF_SEQUENCE: inference_pb2.FINISH_REASON_END_OF_SEQUENCE,
}


def token_logprobs(logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> list[inference_pb2.TokenLogprob]:
    return [inference_pb2.TokenLogprob(
                token_id=lp.token, token=lp.text, logprob=lp.logprob,
                top_logprobs=[inference_pb2.TopLogprob(token_id=t, token=x, logprob=v) for t, x, v in lp.top])
            for lp in logprobs]


def _outcome(text: str, finish: FinishReason | None, tools: str) -> tuple[int, list[inference_pb2.ToolCall]]:
    """A choice's finish reason and, when tools are on and it wrote some, its tool calls."""
    _, calls = parse_tool_calls(text, tools)
    reason = inference_pb2.FINISH_REASON_TOOL_CALLS if calls else \
        _FINISH.get(finish, inference_pb2.FINISH_REASON_UNSPECIFIED)
    return reason, [inference_pb2.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments) for c in calls]


def answer(events: list[Event], prompt_tokens: int, adapter: str, adapter_version: str = "",
           tools: str = "", request_id: str = "") -> inference_pb2.GenerateResponse:
    """Generate's answer from all of a request's events (every choice's, the last of each with its outcome);
    `tools`: how answers are read for tool calls (server/edge/tools.py's mode); `request_id`: what feedback
    names the answer by."""
    texts, logprobs, last = defaultdict(list), defaultdict(list), {}
    prompt = ()
    for event in events:
        texts[event.index].append(event.text)
        logprobs[event.index].extend(event.logprobs)
        prompt = prompt or event.prompt_logprobs
        if event.finish_reason is not None:
            last[event.index] = event
    choices = []
    for i in sorted(last):
        text = "".join(texts[i])
        reason, calls = _outcome(text, last[i].finish_reason, tools)
        choices.append(inference_pb2.Choice(index=i, text=text, completion_tokens=last[i].completion_tokens,
                                            finish_reason=reason, logprobs=token_logprobs(logprobs[i]),
                                            tool_calls=calls))
    first = choices[0]
    return inference_pb2.GenerateResponse(
        text=first.text, finish_reason=first.finish_reason, prompt_tokens=prompt_tokens,
        completion_tokens=sum(c.completion_tokens for c in choices), adapter=adapter,
        adapter_version=adapter_version, logprobs=first.logprobs, choices=choices if len(choices) > 1 else [],
        prompt_logprobs=token_logprobs(prompt), tool_calls=first.tool_calls, request_id=request_id)


class StreamAnswer:
    """GenerateStream's messages for one request, event by event: each piece, and on a choice's last the
    outcome too (with tools, the calls read from the choice's whole text)."""

    def __init__(self, prompt_tokens: int, adapter: str, adapter_version: str = "", tools: str = "",
                 request_id: str = ""):
        self.prompt_tokens, self.adapter, self.adapter_version = prompt_tokens, adapter, adapter_version
        self.tools, self.request_id = tools, request_id
        self._texts: dict[int, list[str]] = defaultdict(list)

    def message(self, event: Event) -> inference_pb2.GenerateResponse:
        message = inference_pb2.GenerateResponse(text=event.text, logprobs=token_logprobs(event.logprobs),
                                                 choice_index=event.index,
                                                 prompt_logprobs=token_logprobs(event.prompt_logprobs))
        self._texts[event.index].append(event.text)
        if event.finish_reason is not None:
            reason, calls = _outcome("".join(self._texts.pop(event.index)), event.finish_reason, self.tools)
            message.MergeFrom(inference_pb2.GenerateResponse(
                finish_reason=reason, prompt_tokens=self.prompt_tokens, completion_tokens=event.completion_tokens,
                adapter=self.adapter, adapter_version=self.adapter_version, tool_calls=calls,
                request_id=self.request_id))
        return message
