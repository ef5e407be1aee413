"""OpenAI's tools, tool_choice and messages' tool_calls, as a chat body gives them -> server/edge/tools.py's values."""
from __future__ import annotations

import json

from ..errors import InvalidArgument
from .tools import Tool, ToolCall, hermes_text


def parse_tools(fields: dict) -> dict:
    """The GenerateRequest's tools and tool_choice; {} when the body has neither."""
    if "tools" not in fields and "tool_choice" not in fields:
        return {}
    tools = fields.get("tools", [])
    if not isinstance(tools, list):
        raise InvalidArgument(f"tools must be an array, got {tools!r}", field="tools")
    return {"tools": tuple(_tool(tool, i) for i, tool in enumerate(tools)),
            "tool_choice": _tool_choice(fields.get("tool_choice", ""))}


def _tool(tool: object, i: int) -> Tool:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise InvalidArgument(f'{where} must be {{"type": "function", "function": {{...}}}}', field=where)
    extra = sorted(set(tool) - {"type", "function"}) or sorted(
        set(tool["function"]) - {"name", "description", "parameters", "strict"})
    if extra:
        raise InvalidArgument(f"{where}: {extra[0]} is not supported by this server", field=where)
    function = tool["function"]
    name, description = function.get("name"), function.get("description", "")
    parameters = function.get("parameters", {})
    if not isinstance(name, str):
        raise InvalidArgument(f"{where}.function.name must be a string", field=f"{where}.function.name")
    if not isinstance(description, str):
        raise InvalidArgument(f"{where}.function.description must be a string", field=f"{where}.function.description")
    if not isinstance(parameters, dict):
        raise InvalidArgument(f"{where}.function.parameters must be an object (a JSON Schema)",
                              field=f"{where}.function.parameters")
    return Tool(name, description, json.dumps(parameters) if parameters else "")


def _tool_choice(choice: object) -> str:
    if isinstance(choice, str):
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise InvalidArgument('tool_choice must be "none", "auto", "required" or {"type": "function", '
                              '"function": {"name": ...}}', field="tool_choice")
    return function["name"]


def assistant_calls_text(calls: object, i: int) -> str:
    """An assistant message's tool_calls as the model wrote them, for the template to render again."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidArgument(f"{where} must be an array", field=where)
    texts = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or \
                not isinstance(function.get("arguments"), str):
            raise InvalidArgument(f'{where} entries must be {{"type": "function", "function": {{"name": ..., '
                                  f'"arguments": "<JSON text>"}}}}', field=where)
        try:
            json.loads(function["arguments"])
        except ValueError:
            raise InvalidArgument(f"{where}: arguments must be JSON text", field=where) from None
        texts.append(hermes_text(function["name"], function["arguments"]))
    return "\n".join(texts)


def tool_calls_json(calls: list[ToolCall], stream: bool = False) -> list[dict]:
    """OpenAI's message tool_calls (a stream's delta adds each call's index)."""
    return [{**({"index": n} if stream else {}), "id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for n, c in enumerate(calls)]
