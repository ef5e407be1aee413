"""The sampling values of a request, checked into SamplingParams: what either edge may ask of the sampler."""
from __future__ import annotations

import math

from ..errors import InvalidArgument
from ..engine.penalties import MAX_BIASED
from ..engine.sequence import SamplingParams

MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
# OpenAI's cap: past 2 the distribution is near uniform over the vocabulary and the text is noise.
MAX_TEMPERATURE = 2.0
MAX_PENALTY = 2.0                # presence and frequency, OpenAI's range [-2, 2]
MAX_REPETITION_PENALTY = 10.0
MAX_LOGIT_BIAS = 100.0


def sampling_params(request, max_tokens: int, vocab_size: int) -> SamplingParams:
    """`request` a GenerateRequest (unchecked values, None or 0 for unset as documented there)."""
    if request.top_k < 0:
        raise InvalidArgument(f"top_k must be 0 (off) or more, got {request.top_k}", field="top_k")
    return SamplingParams(
        max_tokens=max_tokens, top_p=_top_p(request.top_p),
        temperature=_temperature(request.fallback_temperature if request.temperature is None else request.temperature),
        top_k=request.top_k, seed=request.seed, stop=_stop(request.stop), logprobs=_logprobs(request),
        prompt_logprobs=request.prompt_logprobs,
        presence_penalty=_penalty(request.presence_penalty or 0.0, "presence_penalty"),
        frequency_penalty=_penalty(request.frequency_penalty or 0.0, "frequency_penalty"),
        repetition_penalty=_repetition(request.repetition_penalty or 0.0),
        logit_bias=_logit_bias(request.logit_bias, vocab_size))


def _logprobs(request) -> int | None:
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


def _penalty(value: float, name: str) -> float:
    if not math.isfinite(value) or abs(value) > MAX_PENALTY:
        raise InvalidArgument(f"{name} must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value:g}", field=name)
    return value


def _repetition(value: float) -> float:
    """0: unset (1, no penalty)."""
    if not math.isfinite(value) or value < 0 or value > MAX_REPETITION_PENALTY:
        raise InvalidArgument(f"repetition_penalty must be above 0 and at most {MAX_REPETITION_PENALTY:g} "
                              f"(1: none), got {value:g}", field="repetition_penalty")
    return value or 1.0


def _logit_bias(entries: tuple[tuple[int, float], ...], vocab_size: int) -> tuple[tuple[int, float], ...]:
    if len(entries) > MAX_BIASED:
        raise InvalidArgument(f"logit_bias has {len(entries)} entries; at most {MAX_BIASED}",
                              field="logit_bias")
    for token, bias in entries:
        if not 0 <= token < vocab_size:
            raise InvalidArgument(f"logit_bias names token {token}; token ids are 0 to {vocab_size - 1}",
                                  field="logit_bias")
        if not math.isfinite(bias) or abs(bias) > MAX_LOGIT_BIAS:
            raise InvalidArgument(f"logit_bias[{token}] must be between -{MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}, "
                                  f"got {bias:g}", field="logit_bias")
    return tuple(sorted(entries))


def _stop(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(values) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop has {len(values)} strings; at most {MAX_STOP_STRINGS}", field="stop")
    for i, value in enumerate(values):
        if not value or len(value) > 256:
            raise InvalidArgument(f"stop[{i}] must be 1 to 256 characters", field="stop")
    return tuple(values)
