"""OpenAI's wire format: a chat or completions body into a GenerateRequest, and results back into
OpenAI's response and chunk objects.

Only JSON types and OpenAI's own conventions are checked here (what a field may hold, which fields
exist); what the values may be is checked in generate_request.py, the path the gRPC edge takes too.
A field we do not implement is refused by name, never ignored.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass

from ..errors import InvalidArgument
from . import tools
from .generate_request import GenerateRequest
from .openai_tools import assistant_calls_text, parse_tools

BASE_ALIAS = "base"    # `model` naming the base model alone, whatever its directory is called
_COMMON = ("model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "stream_options", "user",
           "response_format", "logprobs", "n", "presence_penalty", "frequency_penalty", "repetition_penalty",
           "logit_bias")
_CHAT_FIELDS = frozenset({*_COMMON, "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice"})
_COMPLETION_FIELDS = frozenset({*_COMMON, "prompt", "echo"})
# Fields accepted only at the value that asks for nothing beyond what we do.
_NEUTRAL = {"best_of": (1,), "parallel_tool_calls": (False,), "suffix": ("",)}
# response_format's keys by type; the values are checked (and compiled) in generate_request.py.
_FORMAT_KEYS = {"text": set(), "json_object": set(), "json_schema": {"json_schema"}, "regex": {"regex"},
                "choice": {"choice"}}


@dataclass(frozen=True, slots=True)
class OpenAIRequest:
    """One checked chat or completions body."""
    chat: bool
    model: str                   # as the caller named it: echoed in every response
    generate: GenerateRequest
    stream: bool
    include_usage: bool          # stream_options.include_usage: a last chunk with the token counts
    logprobs: bool = False       # each choice carries its tokens' logprobs
    echo: bool = False           # completions: each choice's text (and logprobs) begins with the prompt's
    tools: str = ""              # how answers are read for tool calls: tools.mode


def parse(body: object, chat: bool, base_name: str) -> OpenAIRequest:
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    fields = {k: v for k, v in body.items() if v is not None}      # JSON null means unset, as in OpenAI's API
    _refuse_unsupported(fields, _CHAT_FIELDS if chat else _COMPLETION_FIELDS)
    model = _typed(fields, "model", str, required=True)
    stream = _typed(fields, "stream", bool, default=False)
    options = _typed(fields, "stream_options", dict, default={})
    if options and not stream:
        raise InvalidArgument("stream_options is only allowed with stream: true", field="stream_options")
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise InvalidArgument(f"stream_options.{unknown[0]} is not supported by this server", field="stream_options")
    include_usage = _typed(options, "include_usage", bool, default=False, prefix="stream_options.")
    top_p = _number(fields, "top_p", 0.0)      # absent: 0, unset (the adapter's default, else 1)
    if "top_p" in fields and top_p == 0:  # 0 means "no cut" on the gRPC edge; an OpenAI caller means something else
        raise InvalidArgument("top_p must be above 0 and at most 1 (1 keeps every token)", field="top_p")
    seed = _typed(fields, "seed", int)
    if seed is not None and seed < 0:
        raise InvalidArgument(f"seed must be 0 or more, got {seed}", field="seed")
    generate = GenerateRequest(
        **(_messages(fields) if chat else _prompt(fields)),
        adapter="" if model in (BASE_ALIAS, base_name) else model, adapter_field="model",
        max_tokens=_max_tokens(fields, chat), temperature=_optional_number(fields, "temperature"),
        fallback_temperature=1.0, top_p=top_p,
        top_k=_typed(fields, "top_k", int, default=0), seed=seed, stop=_stop(fields),
        # OpenAI's end-user id: what keeps a user on one side of a canary split.
        routing_key=_typed(fields, "user", str, default=""), routing_key_field="user",
        **_response_format(fields), **_logprobs(fields, chat), **_sampling_controls(fields),
        **(parse_tools(fields) if chat else {}))
    echo = not chat and _typed(fields, "echo", bool, default=False)
    if echo and generate.logprobs:
        generate = dataclasses.replace(generate, prompt_logprobs=True)
    return OpenAIRequest(chat, model, generate, stream, include_usage, generate.logprobs, echo,
                         tools.mode(generate.tools, generate.tool_choice))


def _sampling_controls(fields: dict) -> dict:
    """n, the penalties and logit_bias (JSON object keys are strings: token ids as decimal text)."""
    n = _typed(fields, "n", int, default=1)
    if n < 1:
        raise InvalidArgument(f"n must be at least 1, got {n}", field="n")
    repetition = _optional_number(fields, "repetition_penalty")
    if repetition is not None and repetition <= 0:   # 0 means "none" on the gRPC edge; not so for an HTTP caller
        raise InvalidArgument(f"repetition_penalty must be above 0 (1: none), got {repetition:g}",
                              field="repetition_penalty")
    bias = _typed(fields, "logit_bias", dict, default={})
    entries = []
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 10:   # (int() refuses 4,300 digits and more)
            raise InvalidArgument(f"logit_bias keys must be token ids, got {key!r}", field="logit_bias")
        entries.append((int(key), _number(bias, key, 0.0, prefix="logit_bias.")))
    return {"n": n, "presence_penalty": _optional_number(fields, "presence_penalty"),
            "frequency_penalty": _optional_number(fields, "frequency_penalty"), "repetition_penalty": repetition,
            "logit_bias": tuple(entries)}


def parse_feedback(body: object) -> dict:
    """POST /v1/feedback: {"id": the response's id, "score": -1 to 1, "tag": optional label}; the values are
    checked where gRPC's Feedback checks them (server/engine/feedback.py)."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    _refuse_unsupported(body, frozenset({"id", "score", "tag"}))
    score = body.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise InvalidArgument(f"score must be a number from -1 to 1, got {score!r}", field="score")
    return {"id": _typed(body, "id", str, required=True), "score": float(score),
            "tag": _typed(body, "tag", str, default="")}


def _logprobs(fields: dict, chat: bool) -> dict:
    """Chat: logprobs true/false and top_logprobs n; completions: logprobs n (the alternatives per token)."""
    if chat:
        return {"logprobs": _typed(fields, "logprobs", bool, default=False),
                "top_logprobs": _typed(fields, "top_logprobs", int, default=0)}
    top = _typed(fields, "logprobs", int)
    return {"logprobs": top is not None, "top_logprobs": top or 0}


def _response_format(fields: dict) -> dict:
    """OpenAI's response_format (and our regex and choice types) -> the GenerateRequest's format fields;
    absent: unset (the adapter's default format, else plain text)."""
    if "response_format" not in fields:
        return {}
    fmt = _typed(fields, "response_format", dict)
    kind = _typed(fmt, "type", str, required=True, prefix="response_format.")
    if kind not in _FORMAT_KEYS:
        raise InvalidArgument(f"response_format.type is {kind!r}; expected one of {sorted(_FORMAT_KEYS)}",
                              field="response_format.type")
    extra = sorted(set(fmt) - {"type"} - _FORMAT_KEYS[kind])
    if extra:
        raise InvalidArgument(f"response_format.{extra[0]} is not allowed with type {kind!r}",
                              field=f"response_format.{extra[0]}")
    out = {"response_format": kind}
    if kind == "json_schema":
        spec = _typed(fmt, "json_schema", dict, required=True, prefix="response_format.")
        extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if extra:
            raise InvalidArgument(f"response_format.json_schema.{extra[0]} is not supported by this server",
                                  field=f"response_format.json_schema.{extra[0]}")
        prefix = "response_format.json_schema."
        _typed(spec, "name", str, required=True, prefix=prefix)
        _typed(spec, "strict", bool, prefix=prefix)
        _typed(spec, "description", str, prefix=prefix)
        schema = _typed(spec, "schema", dict, required=True, prefix=prefix)
        out["json_schema"] = json.dumps(schema)
    elif kind == "regex":
        out["regex"] = _typed(fmt, "regex", str, required=True, prefix="response_format.")
    elif kind == "choice":
        choice = _typed(fmt, "choice", list, required=True, prefix="response_format.")
        if not all(isinstance(c, str) for c in choice):
            raise InvalidArgument("response_format.choice must be an array of strings", field="response_format.choice")
        out["choice"] = tuple(choice)
    return out


def _refuse_unsupported(fields: dict, supported: frozenset[str]) -> None:
    for name, value in fields.items():
        if name in supported:
            continue
        # `True == 1` in Python; in JSON true is no count, so the kinds must agree too.
        if any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in _NEUTRAL.get(name, ())):
            continue
        what = f"{name}={value!r}" if name in _NEUTRAL else name
        close = [] if name in _NEUTRAL else difflib.get_close_matches(name, sorted(supported), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise InvalidArgument(f"{what} is not supported by this server{hint}", field=name)


def _typed(fields: dict, name: str, kind: type, default=None, required: bool = False, prefix: str = ""):
    if name not in fields:
        if required:
            raise InvalidArgument(f"{prefix}{name} is required", field=prefix + name)
        return default
    value = fields[name]
    # bool is an int in Python, but not in JSON: true is no token count.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidArgument(f"{prefix}{name} must be {_JSON_TYPE[kind]}, got {value!r}", field=prefix + name)
    return value


_JSON_TYPE = {str: "a string", bool: "true or false", dict: "an object", int: "an integer", list: "an array"}


def _number(fields: dict, name: str, default: float, prefix: str = "") -> float:
    value = fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{prefix}{name} must be a number, got {value!r}", field=prefix + name)
    try:
        return float(value)
    except OverflowError:      # a JSON integer too large for a float
        raise InvalidArgument(f"{prefix}{name} is out of range", field=prefix + name) from None


def _optional_number(fields: dict, name: str) -> float | None:
    return _number(fields, name, 0.0) if name in fields else None


def _max_tokens(fields: dict, chat: bool) -> int:
    value = _typed(fields, "max_tokens", int)
    if chat:
        newer = _typed(fields, "max_completion_tokens", int)
        if value is not None and newer is not None and value != newer:
            raise InvalidArgument(f"max_tokens ({value}) and max_completion_tokens ({newer}) disagree; give one",
                                  field="max_completion_tokens")
        value = newer if newer is not None else value
    if value is not None and value < 1:
        raise InvalidArgument(f"max_tokens must be at least 1, got {value}", field="max_tokens")
    return value or 0


def _stop(fields: dict) -> tuple[str, ...]:
    value = fields.get("stop", [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise InvalidArgument(f"stop must be a string or an array of strings, got {value!r}", field="stop")
    return tuple(values)


def _prompt(fields: dict) -> dict:
    prompt = fields.get("prompt")
    # The openai client sends a list for one prompt too; several prompts would be n requests in one.
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgument("prompt must be one string (arrays of several prompts or of token ids are not "
                              "supported by this server)", field="prompt")
    return {"prompt": prompt}


def _messages(fields: dict) -> dict:
    messages = _typed(fields, "messages", list, required=True)
    if not messages:
        raise InvalidArgument("messages must hold at least one message", field="messages")
    pairs = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidArgument(f"messages[{i}] must be an object", field=f"messages[{i}]")
        role = _typed(message, "role", str, required=True, prefix=f"messages[{i}].")
        # A tool result's id is for the caller: the templates we render pair results with calls by order.
        allowed = {"role", "content", "name"} | {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}.get(role, set())
        extra = sorted(set(message) - allowed)
        if extra:
            raise InvalidArgument(f"messages[{i}].{extra[0]} is not supported by this server",
                                  field=f"messages[{i}].{extra[0]}")
        if message.get("tool_calls") is not None:
            calls = assistant_calls_text(message["tool_calls"], i)
            content = "" if message.get("content") is None else _content(message["content"], i)
            pairs.append((role, "\n".join(filter(None, (content, calls)))))
        else:
            pairs.append((role, _content(message.get("content"), i)))
    return {"messages": tuple(pairs)}


def _content(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    # Content parts: text ones are joined; images and audio need a model that sees them.
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        kinds = sorted({p.get("type") for p in content} - {"text"}, key=str)
        if kinds:
            raise InvalidArgument(f"messages[{i}].content parts of type {kinds[0]!r} are not supported by this server",
                                  field=f"messages[{i}].content")
        if all(isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
    raise InvalidArgument(f"messages[{i}].content must be a string or an array of text parts",
                          field=f"messages[{i}].content")
