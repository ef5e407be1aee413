"""Engine events into OpenAI's response and chunk objects, for chat and completions, with n choices."""
from __future__ import annotations

import time
import uuid
from collections import defaultdict

from ..engine.sequence import Event, FinishReason, TokenLogprob
from .openai_api import OpenAIRequest
from .openai_tools import tool_calls_json
from .tools import parse_tool_calls

_FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.END_OF_SEQUENCE: "stop"}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseWriter:
    """OpenAI objects for one request: the whole response, or its stream of chunks."""

    def __init__(self, request: OpenAIRequest):
        self.request = request
        self.id = f"{'chatcmpl' if request.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._offset: dict[int, int] = defaultdict(int)   # completions' text_offset of each choice's next token
        self._started: set[int] = set()                    # choices whose first chunk is out
        self._held: dict[int, list[Event]] = defaultdict(list)   # with tools: each chat choice's events so far

    @property
    def _kind(self) -> str:
        return "chat.completion" if self.request.chat else "text_completion"

    def logprobs(self, index: int, logprobs: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> dict | None:
        """A choice's logprobs object, OpenAI's chat or completions shape; None when not asked for."""
        if not self.request.logprobs:
            return None
        if self.request.chat:
            return {"content": [{"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.text.encode()),
                                 "top_logprobs": [{"token": x, "logprob": v, "bytes": list(x.encode())}
                                                  for _, x, v in lp.top]} for lp in logprobs]}
        offsets = []
        for lp in logprobs:
            offsets.append(self._offset[index])
            self._offset[index] += len(lp.text)
        # A prompt's first token (echo) has no logprob and no alternatives: null for both, as OpenAI gives.
        return {"tokens": [lp.text for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
                "top_logprobs": [None if lp.logprob is None else {x: v for _, x, v in lp.top} for lp in logprobs],
                "text_offset": offsets}

    def _object(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model,
                "choices": choices, **extra}

    def _choice(self, index: int, text: str, reason: str | None, logprobs: list[TokenLogprob],
                body: dict | None = None) -> dict:
        """A choice: completions' text, or chat's `body` (its message, or a chunk's delta)."""
        if not self.request.chat:
            return {"index": index, "text": text, "logprobs": self.logprobs(index, logprobs), "finish_reason": reason}
        return {"index": index, **body, "logprobs": self.logprobs(index, logprobs), "finish_reason": reason}

    def _message(self, text: str, stream: bool) -> tuple[dict, bool]:
        """A whole chat answer's message, with its tool calls parsed out when tools are on; and whether it has any."""
        content, calls = parse_tool_calls(text, self.request.tools)
        if not calls:
            return {"role": "assistant", "content": text}, False
        return {"role": "assistant", "content": content or None, "tool_calls": tool_calls_json(calls, stream)}, True

    def response(self, events: list[Event], prompt_tokens: int) -> dict:
        """The whole answer from every event of every choice."""
        texts, logprobs, last = defaultdict(list), defaultdict(list), {}
        for event in events:
            if self.request.echo and event.index not in texts:
                texts[event.index].append(self.request.generate.prompt)
            if self.request.echo:
                logprobs[event.index].extend(event.prompt_logprobs)
            texts[event.index].append(event.text)
            logprobs[event.index].extend(event.logprobs)
            if event.finish_reason is not None:
                last[event.index] = event
        choices = []
        for i in sorted(last):
            text, reason = "".join(texts[i]), _FINISH[last[i].finish_reason]
            message, called = self._message(text, stream=False) if self.request.chat else ({}, False)
            choices.append(self._choice(i, text, "tool_calls" if called else reason, logprobs[i],
                                        {"message": message}))
        return self._object(self._kind, choices,
                            usage=usage(prompt_tokens, sum(e.completion_tokens for e in last.values())))

    def chunks(self, event: Event) -> list[dict]:
        """The chunks of one event: its piece (a choice's first carries the role, or with echo the prompt),
        then on its last the finish reason. With tools a chat choice is held to its end, then sent in one
        delta: only the whole answer tells a tool call from text."""
        if self.request.chat and self.request.tools:
            self._held[event.index].append(event)
            if event.finish_reason is None:
                return []
            held = self._held.pop(event.index)
            message, called = self._message("".join(e.text for e in held), stream=True)
            reason = "tool_calls" if called else _FINISH[event.finish_reason]
            return [self._chunk(self._choice(event.index, "", None, [lp for e in held for lp in e.logprobs],
                                             {"delta": message})),
                    self._chunk(self._choice(event.index, "", reason, [], {"delta": {}}))]
        first = event.index not in self._started
        self._started.add(event.index)
        out = []
        text, logprobs = event.text, list(event.logprobs)
        if first and self.request.echo:
            text, logprobs = self.request.generate.prompt + text, [*event.prompt_logprobs, *logprobs]
        if text or first or logprobs:
            delta = ({"role": "assistant", "content": text} if first else {"content": text} if text else {})
            out.append(self._chunk(self._choice(event.index, text, None, logprobs, {"delta": delta})))
        if event.finish_reason is not None:
            out.append(self._chunk(self._choice(event.index, "", _FINISH[event.finish_reason], [], {"delta": {}})))
        return out

    def _chunk(self, choice: dict) -> dict:
        extra = {"usage": None} if self.request.include_usage else {}
        return self._object(self._kind + (".chunk" if self.request.chat else ""), [choice], **extra)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._object(self._kind + (".chunk" if self.request.chat else ""), [],
                            usage=usage(prompt_tokens, completion_tokens))
