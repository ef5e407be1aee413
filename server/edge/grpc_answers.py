"""Engine events into GenerateResponse messages: the gRPC edge's and the Ray ingress's one way to answer."""
from __future__ import annotations

from collections import defaultdict

from cartridge.v1 import inference_pb2

from ..engine.sequence import Event, FinishReason, TokenLogprob

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


def answer(events: list[Event], prompt_tokens: int, adapter: str,
           adapter_version: str = "") -> inference_pb2.GenerateResponse:
    """Generate's answer from all of a request's events (every choice's, the last of each with its outcome)."""
    texts, logprobs, last = defaultdict(list), defaultdict(list), {}
    prompt = ()
    for event in events:
        texts[event.index].append(event.text)
        logprobs[event.index].extend(event.logprobs)
        prompt = prompt or event.prompt_logprobs
        if event.finish_reason is not None:
            last[event.index] = event
    choices = [inference_pb2.Choice(
                   index=i, text="".join(texts[i]), completion_tokens=last[i].completion_tokens,
                   finish_reason=_FINISH.get(last[i].finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
                   logprobs=token_logprobs(logprobs[i]))
               for i in sorted(last)]
    first = choices[0]
    return inference_pb2.GenerateResponse(
        text=first.text, finish_reason=first.finish_reason, prompt_tokens=prompt_tokens,
        completion_tokens=sum(c.completion_tokens for c in choices), adapter=adapter,
        adapter_version=adapter_version, logprobs=first.logprobs, choices=choices if len(choices) > 1 else [],
        prompt_logprobs=token_logprobs(prompt))


def stream_message(event: Event, prompt_tokens: int, adapter: str,
                   adapter_version: str = "") -> inference_pb2.GenerateResponse:
    """GenerateStream's message for one event: its piece, and on a choice's last the outcome too."""
    message = inference_pb2.GenerateResponse(text=event.text, logprobs=token_logprobs(event.logprobs),
                                             choice_index=event.index,
                                             prompt_logprobs=token_logprobs(event.prompt_logprobs))
    if event.finish_reason is not None:
        message.MergeFrom(inference_pb2.GenerateResponse(
            finish_reason=_FINISH.get(event.finish_reason, inference_pb2.FINISH_REASON_UNSPECIFIED),
            prompt_tokens=prompt_tokens, completion_tokens=event.completion_tokens, adapter=adapter,
            adapter_version=adapter_version))
    return message
