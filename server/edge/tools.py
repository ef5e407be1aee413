"""Tools on chat: the functions a request offers, rendered by the base's chat template, and the calls parsed
back from the answer.

Calls are read in the Hermes form that tool-capable ChatML templates ask for (Qwen 2.5, Hermes):
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call. When tool_choice forces a call
("required", or one function by name) the answer is constrained by a JSON-schema grammar to the bare object
`{"name": ..., "arguments": ...}`, the arguments by the function's parameters schema, so it always parses.
A template supports tools when its source reads the `tools` variable transformers hands it.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..engine.grammar import ResponseFormat

MODES = ("none", "auto", "required")       # tool_choice besides a function's name
MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")   # OpenAI's rule for function names
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = ""          # the arguments' JSON Schema as JSON text; empty: any object


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str                # JSON text, as OpenAI gives it


def check_tools(tools: tuple[Tool, ...], tool_choice: str) -> None:
    if not tools:
        if tool_choice and tool_choice != "none":
            raise InvalidArgument("tool_choice needs tools", field="tool_choice")
        return
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument(f"tools has {len(tools)} functions; at most {MAX_TOOLS}", field="tools")
    names = [tool.name for tool in tools]
    for i, tool in enumerate(tools):
        if not _NAME.fullmatch(tool.name):
            raise InvalidArgument(f"tools[{i}].function.name {tool.name!r} must be 1 to 64 letters, digits, '_' or '-'",
                                  field=f"tools[{i}].function.name")
        if tool.parameters and not isinstance(_json(tool.parameters, f"tools[{i}].function.parameters"), dict):
            raise InvalidArgument(f"tools[{i}].function.parameters must be a JSON Schema object",
                                  field=f"tools[{i}].function.parameters")
    if len(set(names)) < len(names):
        raise InvalidArgument("tools names a function twice", field="tools")
    if tool_choice and tool_choice not in MODES and tool_choice not in names:
        raise InvalidArgument(f"tool_choice {tool_choice!r} is none of {MODES} and no function in tools",
                              field="tool_choice")


def mode(tools: tuple[Tool, ...], tool_choice: str) -> str:
    """How the answer is read: "" (no tools, or tool_choice none), "auto" (calls if it writes any), "forced"."""
    if not tools or tool_choice == "none":
        return ""
    return "auto" if tool_choice in ("", "auto") else "forced"


def template_tools(tools: tuple[Tool, ...]) -> list[dict]:
    """The tools as chat templates read them: OpenAI's request shape."""
    return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                              "parameters": json.loads(t.parameters or '{"type": "object"}')}}
            for t in tools]


def forced_format(tools: tuple[Tool, ...], tool_choice: str) -> ResponseFormat:
    """The JSON-schema format of a forced call: to the function named, or ("required") to any of them."""
    chosen = tools if tool_choice == "required" else [t for t in tools if t.name == tool_choice]
    schemas = [{"type": "object", "properties": {"name": {"type": "string", "enum": [t.name]},
                                                 "arguments": json.loads(t.parameters or '{"type": "object"}')},
                "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return ResponseFormat("json_schema", json.dumps(schema, separators=(",", ":")))


def parse_tool_calls(text: str, how: str) -> tuple[str, list[ToolCall]]:
    """(the text besides the calls, the calls) of an answer read as `how` (see mode). An answer whose call
    does not parse (cut short by max_tokens) stays text."""
    if how == "forced":
        call = _call(text)
        return ("", [call]) if call is not None else (text, [])
    if how != "auto":
        return text, []
    calls = [_call(block) for block in _CALL.findall(text)]
    if not calls or None in calls:
        return text, []
    return _CALL.sub("", text).strip(), calls


def hermes_text(name: str, arguments: str) -> str:
    """A call as the model writes it: how an assistant message's tool_calls are sent back to the template."""
    return f'<tool_call>{{"name": {json.dumps(name)}, "arguments": {arguments}}}</tool_call>'


def _call(text: str) -> ToolCall | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or "arguments" not in body:
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", body["name"], json.dumps(body["arguments"]))


def _json(text: str, field: str):
    try:
        return json.loads(text)
    except ValueError as err:
        raise InvalidArgument(f"{field} is not valid JSON: {err}", field=field) from None
