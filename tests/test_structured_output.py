"""Structured output (response_format) and logprobs, against a real server over HTTP (openai) and gRPC."""
from __future__ import annotations

import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
import torch

from cartridge.v1 import inference_pb2

from .conftest import PROMPT

EXAMPLE_ADAPTER = Path(__file__).resolve().parent.parent / "adapters" / "examples" / "records"
ORDER = "Extract this order as JSON.\nOrder 2685 was placed by Greta Kowalski on 2024-07-16 for 7 x blue kettle, " \
        "to be shipped to Bergen."
ORDER_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "integer", "minimum": 0, "maximum": 99999}, "customer": {"type": "string", "maxLength": 20},
                   "city": {"type": "string", "enum": ["Bergen", "Porto", "Oslo"]}},
    "required": ["order_id", "customer", "city"], "additionalProperties": False}
FLAG_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server_flags() -> list[str]:
    return ["--http-port", "0", "--max-batch-size", "8", "--max-adapters", "2", "--max-lora-rank", "8",
            "--max-seq-len", "256", "--adapter", f"records={EXAMPLE_ADAPTER}"]


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def chat(api, model: str, content: str, **fields):
    return api.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                       **{"temperature": 0, **fields})


def test_a_batch_mixing_schemas_and_free_rows_validates_and_leaves_free_rows_untouched(api):
    free = [("records", ORDER, {}), ("base", "Name three colours.", {})]
    constrained = [("records", ORDER, {"response_format": schema_format(ORDER_SCHEMA)}),
                   ("base", ORDER, {"response_format": schema_format(ORDER_SCHEMA)}),
                   ("base", "Is the sky blue? Answer in JSON.", {"response_format": schema_format(FLAG_SCHEMA)}),
                   ("records", "Is water wet?", {"response_format": schema_format(FLAG_SCHEMA)})]

    def run(rows):
        with ThreadPoolExecutor(len(rows)) as pool:
            return list(pool.map(lambda r: chat(api, r[0], r[1], max_tokens=40, **r[2]), rows))

    alone = run(free)
    mixed = run(free + constrained)
    for before, after in zip(alone, mixed):
        assert after.choices[0].message.content == before.choices[0].message.content
        assert after.choices[0].finish_reason == before.choices[0].finish_reason
    for (_, _, fields), answer in zip(constrained, mixed[len(free):]):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), fields["response_format"]["json_schema"]["schema"])


def test_json_object_is_a_json_object(api):
    answer = chat(api, "base", "Describe a cat as JSON.", max_tokens=48, response_format={"type": "json_object"})
    if answer.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(answer.choices[0].message.content), dict)
    else:   # cut by max_tokens: still the beginning of an object
        assert answer.choices[0].message.content.lstrip().startswith("{")


def test_choice_and_regex_always_match_sampled_or_greedy(api, stub):
    choices = ["red", "green", "blue", "not sure"]
    pattern = r"[A-Z][a-z]{2,6}-[0-9]{2}"
    for seed in range(3):
        picked = api.completions.create(model="base", prompt="My favourite colour is", max_tokens=8, temperature=1.5,
                                        seed=seed, extra_body={"response_format": {"type": "choice", "choice": choices}})
        assert picked.choices[0].text in choices and picked.choices[0].finish_reason == "stop"
        code = chat(api, "records", "Make up a product code.", max_tokens=12, temperature=1.0, seed=seed,
                    response_format={"type": "regex", "regex": pattern})
        assert re.fullmatch(pattern, code.choices[0].message.content) and code.choices[0].finish_reason == "stop"
    answer = stub.Generate(inference_pb2.GenerateRequest(
        prompt=PROMPT, max_tokens=8, response_format=inference_pb2.ResponseFormat(type="choice", choice=choices)))
    assert answer.text in choices and answer.finish_reason == inference_pb2.FINISH_REASON_STOP
    answer = stub.Generate(inference_pb2.GenerateRequest(
        prompt=PROMPT, max_tokens=8, response_format=inference_pb2.ResponseFormat(type="regex", regex=pattern)))
    assert re.fullmatch(pattern, answer.text)
    schema = stub.Generate(inference_pb2.GenerateRequest(
        messages=[inference_pb2.ChatMessage(role="user", content=ORDER)], adapter="records", max_tokens=40,
        response_format=inference_pb2.ResponseFormat(type="json_schema", json_schema=json.dumps(ORDER_SCHEMA))))
    jsonschema.validate(json.loads(schema.text), ORDER_SCHEMA)


def test_a_grammar_that_cannot_finish_in_max_tokens_ends_with_length(api):
    answer = chat(api, "records", ORDER, max_tokens=3, response_format=schema_format(ORDER_SCHEMA))
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3


BAD_FORMATS = [
    ({"type": "xml"}, "response_format.type", "expected one of"),
    ({"type": "json_schema"}, "response_format.json_schema", "required"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "string"}}, "response_format.json_schema.schema",
     "an object"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
     "response_format.json_schema", "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer", "minimum": 5, "maximum": 1}}},
     "response_format.json_schema", "minimum greater than maximum"),     # impossible: no value fits
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "colour": 1}},
     "response_format.json_schema.colour", "not supported"),
    ({"type": "regex", "regex": "(unclosed"}, "response_format.regex", "cannot be compiled"),
    ({"type": "regex", "regex": ""}, "response_format.regex", "1 to"),
    ({"type": "regex", "regex": "a", "choice": ["a"]}, "response_format.choice", "not allowed"),
    ({"type": "choice", "choice": []}, "response_format.choice", "1 to"),
    ({"type": "choice", "choice": ["a", 3]}, "response_format.choice", "strings"),
    ({"type": "choice", "choice": ["a", ""]}, "response_format.choice", "non-empty"),
    ("json", "response_format", "an object"),
    ({}, "response_format.type", "required"),
]


@pytest.mark.parametrize("fmt, param, words", BAD_FORMATS)
def test_bad_response_formats_are_400s_naming_the_field(api, fmt, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(api, "base", "hi", max_tokens=4, response_format=fmt)
    assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body


@pytest.mark.parametrize("fields, param, words", [
    (dict(logprobs="yes"), "logprobs", "true or false"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs", "between 0 and 20"),
    (dict(logprobs=True, top_logprobs=-1), "top_logprobs", "between 0 and 20"),
    (dict(logprobs=True, top_logprobs=1.5), "top_logprobs", "an integer"),
    (dict(top_logprobs=3), "top_logprobs", "needs logprobs"),
])
def test_bad_logprobs_are_400s_naming_the_field(api, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        chat(api, "base", "hi", max_tokens=4, **fields)
    assert caught.value.body["param"] == param and words in caught.value.body["message"], caught.value.body


def test_bad_completion_logprobs_is_a_400(api):
    for value, words in ((True, "an integer"), (21, "between 0 and 20")):
        with pytest.raises(openai.BadRequestError) as caught:
            api.completions.create(model="base", prompt=PROMPT, max_tokens=2, logprobs=value)
        assert caught.value.body["param"] in ("logprobs", "top_logprobs") and words in caught.value.body["message"]


@pytest.mark.parametrize("request_fields, words", [
    (dict(response_format=inference_pb2.ResponseFormat(type="json_schema", json_schema="{not json")), "not valid JSON"),
    (dict(response_format=inference_pb2.ResponseFormat(type="json_schema", json_schema='{"type": "nonsense"}')),
     "cannot be compiled"),
    (dict(response_format=inference_pb2.ResponseFormat(type="regex", regex="[z-a]")), "cannot be compiled"),
    (dict(response_format=inference_pb2.ResponseFormat(type="json_schema", json_schema='{"enum": []}')),
     "enum array must not be empty"),
    (dict(response_format=inference_pb2.ResponseFormat(type="choice")), "response_format.choice"),
    (dict(response_format=inference_pb2.ResponseFormat(type="yaml")), "response_format.type"),
    (dict(response_format=inference_pb2.ResponseFormat(regex="a")), "response_format.regex"),
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "needs logprobs"),
])
def test_bad_new_grpc_fields_are_invalid_argument_and_the_server_keeps_serving(stub, request_fields, words):
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2, **request_fields))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in caught.value.details()
    assert stub.Generate(inference_pb2.GenerateRequest(prompt="hi", max_tokens=2)).completion_tokens == 2


def test_greedy_logprobs_match_a_transformers_forward(api, stub, base_model, tokenizer):
    answer = api.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=5)
    lp = answer.choices[0].logprobs
    grpc_answer = stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=6, logprobs=True,
                                                             top_logprobs=5))
    ids = tokenizer.encode(PROMPT)
    chosen = [t.token_id for t in grpc_answer.logprobs]
    assert len(chosen) == len(lp.token_logprobs) == 6
    with torch.no_grad():
        logits = base_model(torch.tensor([ids + chosen])).logits[0, len(ids) - 1:-1].float()
    expected = torch.log_softmax(logits, dim=-1)
    for step, token in enumerate(chosen):
        assert abs(lp.token_logprobs[step] - expected[step, token].item()) < 1e-4, step
        assert abs(grpc_answer.logprobs[step].logprob - expected[step, token].item()) < 1e-4, step
        top = grpc_answer.logprobs[step].top_logprobs
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert top[0].token_id == token                              # greedy: the chosen token is the likeliest
        assert [t.token_id for t in top] == expected[step].topk(5).indices.tolist()
        assert list(lp.top_logprobs[step].values()) == [t.logprob for t in top]
    assert "".join(lp.tokens) == answer.choices[0].text


def test_chat_top_logprobs_are_sorted_and_hold_the_sampled_token_streamed_or_not(api):
    fields = dict(max_tokens=8, temperature=0.8, seed=5, logprobs=True, top_logprobs=20)
    answer = chat(api, "records", "Name a city.", **fields)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens
    for token in content:
        values = [t.logprob for t in token.top_logprobs]
        assert len(values) == 20 and values == sorted(values, reverse=True)
        assert math.isfinite(token.logprob) and token.logprob <= 0
        # Sampled tokens are drawn from within the top 20 here (temperature 0.8, short answer).
        assert token.token in [t.token for t in token.top_logprobs]
    chunks = list(api.chat.completions.create(model="records", messages=[{"role": "user", "content": "Name a city."}],
                                              stream=True, **fields))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # The second call finds the first's prompt blocks in the prefix cache and computes only the rest: the same
    # tokens, with logprobs equal to float32 rounding (another split of the same sums).
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(streamed, content))


def test_logprobs_under_a_grammar_put_all_mass_on_allowed_tokens(api):
    answer = api.completions.create(model="base", prompt="Pick one:", max_tokens=4, temperature=0, logprobs=20,
                                    extra_body={"response_format": {"type": "choice", "choice": ["alpha", "beta"]}})
    first = answer.choices[0].logprobs.top_logprobs[0]
    assert first and all(tok and ("alpha".startswith(tok) or "beta".startswith(tok)) for tok in first), first
    assert abs(sum(math.exp(v) for v in first.values()) - 1) < 1e-4
