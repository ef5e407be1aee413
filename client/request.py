"""A GenerateRequest from a caller's keyword options, in the shapes OpenAI's API uses (response_format,
tools, tool_choice). Only what the proto cannot carry is refused here: the server judges the values."""
from __future__ import annotations

import json
from typing import Mapping, Sequence

from cartridge.v1 import inference_pb2

UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
# response_format's keys besides "type", by type; another type is sent as is for the server to refuse.
FORMAT_KEYS = {"text": (), "json_object": (), "json_schema": ("json_schema",), "regex": ("regex",),
               "choice": ("choice",)}


def generate_request(prompt: str = "", *, messages: Sequence[Mapping[str, str]] = (), adapter: str = "",
                     max_tokens: int = 0, temperature: float | None = None, top_p: float = 0.0, top_k: int = 0,
                     seed: int | None = None, stop: Sequence[str] = (), response_format: Mapping | None = None,
                     logprobs: bool = False, top_logprobs: int = 0, prompt_logprobs: bool = False,
                     presence_penalty: float | None = None, frequency_penalty: float | None = None,
                     repetition_penalty: float | None = None, logit_bias: Mapping[int, float] | None = None,
                     n: int = 0, tools: Sequence[Mapping] = (), tool_choice: str | Mapping = "",
                     routing_key: str = "") -> inference_pb2.GenerateRequest:
    """Raises ValueError naming the option for a value the proto cannot hold."""
    for field, value, largest in (("max_tokens", max_tokens, UINT32_MAX), ("top_k", top_k, UINT32_MAX),
                                  ("seed", 0 if seed is None else seed, UINT64_MAX),
                                  ("top_logprobs", top_logprobs, UINT32_MAX), ("n", n, UINT32_MAX)):
        _check_whole(field, value, largest)
    return inference_pb2.GenerateRequest(
        prompt=prompt, messages=[inference_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
        adapter=adapter, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop=list(stop), response_format=None if response_format is None else format_message(response_format),
        logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty, logit_bias=_logit_bias(logit_bias or {}), n=n,
        tools=[tool_message(tool, i) for i, tool in enumerate(tools)], tool_choice=_tool_choice(tool_choice),
        routing_key=routing_key)


def format_message(fmt: Mapping) -> inference_pb2.ResponseFormat:
    """{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}, {"type": "json_object"},
    {"type": "regex", "regex": "..."} or {"type": "choice", "choice": [...]} -> the proto's ResponseFormat."""
    kind = fmt.get("type") if isinstance(fmt, Mapping) else None
    if not isinstance(kind, str):
        raise ValueError(f'response_format must be a dict with a "type", got {fmt!r}')
    extra = sorted(set(fmt) - {"type", *FORMAT_KEYS.get(kind, ())})
    if extra:
        raise ValueError(f"response_format of type {kind!r} cannot carry {extra[0]!r}")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, (Mapping, str)):
            raise ValueError('response_format json_schema must be {"name": ..., "schema": {...}} (the schema as a '
                             f"dict or JSON text), got {spec!r}")
        return inference_pb2.ResponseFormat(type=kind, json_schema=schema if isinstance(schema, str)
                                            else json.dumps(schema))
    regex, choice = fmt.get("regex", ""), fmt.get("choice", ())
    if not isinstance(regex, str):
        raise ValueError(f"response_format regex must be a string, got {regex!r}")
    if not isinstance(choice, (list, tuple)) or not all(isinstance(c, str) for c in choice):
        raise ValueError(f"response_format choice must be a list of strings, got {choice!r}")
    return inference_pb2.ResponseFormat(type=kind, regex=regex, choice=choice)


def tool_message(tool: Mapping, i: int = 0) -> inference_pb2.Tool:
    """OpenAI's {"type": "function", "function": {"name", "description", "parameters"}} -> the proto's Tool."""
    function = tool.get("function") if isinstance(tool, Mapping) and tool.get("type") == "function" else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "description": ..., '
                         f'"parameters": {{...}}}}}}, got {tool!r}')
    parameters = function.get("parameters") or ""
    return inference_pb2.Tool(name=function["name"], description=function.get("description", ""),
                              parameters_json=parameters if isinstance(parameters, str) else json.dumps(parameters))


def _tool_choice(choice: str | Mapping) -> str:
    """"none", "auto", "required", a function's name, or OpenAI's {"type": "function", "function": {"name": ...}}."""
    if isinstance(choice, str):
        return choice
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError('tool_choice must be "none", "auto", "required", a function\'s name or '
                         f'{{"type": "function", "function": {{"name": ...}}}}, got {choice!r}')
    return function["name"]


def _logit_bias(bias: Mapping[int, float]) -> dict[int, float]:
    for token, value in bias.items():
        _check_whole("logit_bias token id", token, UINT32_MAX)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ValueError(f"logit_bias[{token}] must be a number, got {value!r}")
    return dict(bias)


def _check_whole(field: str, value: object, largest: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= largest:
        raise ValueError(f"{field} must be a whole number from 0 to {largest}, got {value!r}")
