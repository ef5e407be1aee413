"""Tools on chat, against a real server whose base carries a small tool-capable chat template
(tests/data/tool_chat_template.jinja, the Hermes form) over the embedded model's weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import openai
import pytest

from client.cli import main as cartridge_main
from server.edge.tools import parse_tool_calls

TEMPLATE = Path(__file__).resolve().parent / "data" / "tool_chat_template.jinja"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city today",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def server_flags(base_dir, tmp_path_factory) -> list[str]:
    """The embedded base's files, linked, with the tool-capable template in place of its own."""
    tool_base = tmp_path_factory.mktemp("tool-base")
    for file in base_dir.iterdir():
        if file.name != "chat_template.jinja":
            (tool_base / file.name).symlink_to(file)
    shutil.copyfile(TEMPLATE, tool_base / "chat_template.jinja")
    return ["--base-model", str(tool_base), "--http-port", "0", "--max-batch-size", "4", "--max-seq-len", "512",
            "--max-adapters", "1", "--max-lora-rank", "8"]


def arguments_of(call, tool: dict) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_a_forced_function_is_called_with_arguments_that_fit_its_schema(api):
    answer = api.chat.completions.create(model="base", messages=ASK, tools=[WEATHER, TIME], max_tokens=60,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    arguments_of(choice.message.tool_calls[0], WEATHER)


def test_required_calls_one_of_the_tools_streamed_or_not(api):
    fields = dict(model="base", messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=60,
                  temperature=0)
    call = api.chat.completions.create(**fields).choices[0].message.tool_calls[0]
    arguments_of(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name])
    chunks = list(api.chat.completions.create(stream=True, **fields))
    streamed = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    assert [(c.index, c.function.name, c.function.arguments) for c in streamed] == \
        [(0, call.function.name, call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tools_are_rendered_by_the_template_and_a_tool_result_continues_the_chat(api):
    plain = api.chat.completions.create(model="base", messages=ASK, max_tokens=1)
    offered = api.chat.completions.create(model="base", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=1)
    assert offered.usage.prompt_tokens > plain.usage.prompt_tokens + 30      # the function's signature is in it
    follow_up = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 3}'}]
    answer = api.chat.completions.create(model="base", messages=follow_up, tools=[WEATHER], max_tokens=20,
                                         temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > offered.usage.prompt_tokens


def test_grpc_forced_call_and_its_stream_through_the_client(client):
    fields = dict(messages=ASK, tools=[WEATHER], tool_choice="get_weather", max_tokens=60)
    answer = client.generate(**fields)
    pieces = list(client.generate_stream(**fields))
    assert answer.finish_reason == "tool_calls"
    (call,) = answer.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_") and answer.choices[0].tool_calls == (call,)
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    assert "".join(p.text for p in pieces) == answer.text
    assert pieces[-1].finish_reason == "tool_calls" and pieces[-1].tool_calls[0].arguments == call.arguments


def test_the_command_line_offers_tools_from_a_file_and_prints_the_calls(server, tmp_path, capsys):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER, TIME]))
    assert cartridge_main(["generate", ASK[0]["content"], "--tools", str(tools), "--tool-choice", "get_time",
                           "--max-tokens", "60", "--server", server.address]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tool call: ")]
    call = json.loads(line.removeprefix("tool call: "))
    assert call["name"] == "get_time" and call["id"].startswith("call_")
    jsonschema.validate(call["arguments"], TIME["function"]["parameters"])


def test_calls_are_parsed_from_hermes_blocks_and_text_stays_text():
    text = 'Let me check.\n<tool_call>{"name": "get_time", "arguments": {"city": "Oslo"}}</tool_call>'
    content, calls = parse_tool_calls(text, "auto")
    assert content == "Let me check." and [(c.name, json.loads(c.arguments)) for c in calls] == \
        [("get_time", {"city": "Oslo"})]
    assert parse_tool_calls('<tool_call>{"name": "get_time", "argu', "auto") == \
        ('<tool_call>{"name": "get_time", "argu', [])           # cut short: stays text
    assert parse_tool_calls(text, "") == (text, [])             # no tools, or tool_choice none


@pytest.mark.parametrize("fields, param, words", [
    (dict(tools={"a": 1}), "tools", "an array"),
    (dict(tools=[{"type": "function"}]), "tools[0]", '"type": "function"'),
    (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), "tools[0].function.name", "1 to 64"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]), "tools[0].function.parameters",
     "an object"),
    (dict(tools=[WEATHER, WEATHER]), "tools", "twice"),
    (dict(tools=[WEATHER], tool_choice="get_time"), "tool_choice", "no function in tools"),
    (dict(tools=[WEATHER], tool_choice={"type": "function"}), "tool_choice", "tool_choice must be"),
    (dict(tool_choice="required"), "tool_choice", "needs tools"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "tool_choice",
     "cannot be combined"),
    (dict(messages=[{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]),
     "messages[0].tool_calls", "arguments"),
    (dict(messages=[{"role": "user", "content": "hi", "tool_call_id": "x"}]), "messages[0].tool_call_id",
     "not supported"),
])
def test_bad_tools_are_400s_naming_the_field(api, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(**{"model": "base", "messages": ASK, "max_tokens": 2, **fields})
    assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body
