"""The OpenAI-compatible HTTP edge, called with the real `openai` package, beside gRPC on the same server."""
from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request

import openai
import pytest

from .conftest import PROMPT

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server_flags(adapter_dirs) -> list[str]:
    return ["--http-port", "0", "--max-batch-size", "8", "--max-adapters", "4", "--max-lora-rank", "16",
            "--max-seq-len", "512", "--adapter", f"qv8={adapter_dirs['qv8']}",
            "--adapter", f"all16-rs={adapter_dirs['all16-rs']}"]


def test_chat_completion_matches_grpc(api, client):
    answer = api.chat.completions.create(model="base", messages=CHAT, max_tokens=20, temperature=0)
    grpc_answer = client.generate(messages=CHAT, max_tokens=20)
    choice = answer.choices[0]
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == "base"
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.message.content == grpc_answer.text
    assert choice.finish_reason == "stop"           # end of sequence is OpenAI's "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == \
        (grpc_answer.prompt_tokens, grpc_answer.completion_tokens)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


@pytest.mark.parametrize("adapter", ["qv8", "all16-rs"])
def test_model_names_the_adapter_and_gives_the_grpc_greedy_text(api, client, tokenizer, adapter):
    answer = api.completions.create(model=adapter, prompt=PROMPT, max_tokens=16, temperature=0)
    grpc_answer = client.generate(PROMPT, adapter=adapter, max_tokens=16)
    base = api.completions.create(model="SmolLM2-135M-Instruct", prompt=PROMPT, max_tokens=16, temperature=0)
    assert answer.object == "text_completion" and answer.model == adapter
    assert answer.choices[0].text == grpc_answer.text
    assert answer.choices[0].text != base.choices[0].text, "the adapter should change the output"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    assert answer.usage.completion_tokens == 16


def test_chat_stream_adds_up_to_the_whole_answer_with_usage_last(api):
    whole = api.chat.completions.create(model="qv8", messages=CHAT, max_completion_tokens=24, temperature=0)
    chunks = list(api.chat.completions.create(model="qv8", messages=CHAT, max_completion_tokens=24, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_completion_stream_matches_grpc_stream_without_usage_unless_asked(api, client):
    pieces = [p.text for p in client.generate_stream(PROMPT, adapter="all16-rs", max_tokens=20)]
    chunks = list(api.completions.create(model="all16-rs", prompt=PROMPT, max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "".join(pieces)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)


def test_stop_as_string_or_list_and_seeded_sampling(api):
    full = api.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    stop = full.split()[3]
    for given in (stop, [stop, "never-seen"]):
        cut = api.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0, stop=given).choices[0]
        assert cut.finish_reason == "stop" and cut.text == full[:full.index(stop)]
    sample = dict(model="qv8", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.95)
    runs = [api.completions.create(seed=s, **sample).choices[0].text for s in (7, 8, 7)]
    assert runs[0] == runs[2] != runs[1]
    # OpenAI's range ends at 2, and so does ours (5 is refused: test_bad_chat_requests_...).
    hottest = api.completions.create(model="base", prompt=PROMPT, max_tokens=2, temperature=2, seed=1)
    assert hottest.usage.completion_tokens == 2


def test_models_lists_the_base_and_every_adapter_with_the_base_as_parent(api, client, adapter_dirs):
    client.register_adapter("mlp4", str(adapter_dirs["mlp4"]))
    try:
        models = {m.id: m for m in api.models.list()}
        assert set(models) == {"SmolLM2-135M-Instruct", "qv8", "all16-rs", "mlp4"}
        assert models["SmolLM2-135M-Instruct"].parent is None
        assert {models[a].parent for a in ("qv8", "all16-rs", "mlp4")} == {"SmolLM2-135M-Instruct"}
        assert api.completions.create(model="mlp4", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    finally:
        client.unregister_adapter("mlp4")
    assert "mlp4" not in {m.id for m in api.models.list()}


def test_health_and_metrics_on_the_http_port(server):
    root = server.http_url.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health") as reply:
        assert (reply.status, json.load(reply)) == (200, {"status": "ok"})
    # An endpoint picker scrapes the serving port's /metrics by default: the same registry is there.
    text = urllib.request.urlopen(root + "/metrics").read().decode()
    assert "cartridge_lora_requests_info{" in text and "cartridge_kv_cache_usage_ratio" in text


@pytest.mark.parametrize("fields, error, param, words", [
    (dict(model="no-such-adapter"), openai.NotFoundError, None, "no-such-adapter"),
    (dict(model="bad name!"), openai.BadRequestError, "model", "model 'bad name!'"),
    (dict(temperature=-1), openai.BadRequestError, "temperature", "temperature"),
    (dict(temperature=5), openai.BadRequestError, "temperature", "between 0 (greedy) and 2, got 5"),
    (dict(top_p=1.5), openai.BadRequestError, "top_p", "top_p"),
    (dict(top_p=0), openai.BadRequestError, "top_p", "top_p"),
    (dict(max_tokens=0), openai.BadRequestError, "max_tokens", "max_tokens"),
    (dict(max_tokens=600), openai.BadRequestError, "max_tokens", "at most"),
    (dict(max_tokens=5, max_completion_tokens=6), openai.BadRequestError, "max_completion_tokens", "disagree"),
    (dict(stop=[""]), openai.BadRequestError, "stop", "stop[0]"),
    (dict(stop=[3]), openai.BadRequestError, "stop", "string"),
    (dict(seed=-1), openai.BadRequestError, "seed", "seed"),
    (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, "messages[0].role", "robot"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     openai.BadRequestError, "messages[0].content", "image_url"),
    (dict(messages=[{"role": "user", "content": "word " * 600}]), openai.BadRequestError, "prompt", "context"),
    (dict(messages=[]), openai.BadRequestError, "messages", "at least one"),
    (dict(n=9), openai.BadRequestError, "n", "n must be between 1 and 8, got 9"),
    (dict(logprobs="yes"), openai.BadRequestError, "logprobs", "true or false"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), openai.BadRequestError, "tools",
     "chat template has no tool support"),
    (dict(presence_penalty=2.5), openai.BadRequestError, "presence_penalty", "between -2 and 2"),
    (dict(stream_options={"include_usage": True}), openai.BadRequestError, "stream_options", "stream: true"),
    (dict(extra_body={"guided_json": {}}), openai.BadRequestError, "guided_json", "not supported"),
    (dict(extra_body={"max_tokns": 5}), openai.BadRequestError, "max_tokns",
     "max_tokns is not supported by this server; did you mean max_tokens?"),
    (dict(extra_body={"max_tokens": True}), openai.BadRequestError, "max_tokens", "integer"),
])
def test_bad_chat_requests_get_openai_errors_naming_the_field(api, fields, error, param, words):
    request = {"model": "base", "messages": CHAT, "max_tokens": 4, **fields}
    with pytest.raises(error) as caught:
        api.chat.completions.create(**request)
    body = caught.value.body
    assert caught.value.status_code == {openai.NotFoundError: 404, openai.BadRequestError: 400}[error]
    assert body["param"] == param and words in body["message"] and body["type"]


@pytest.mark.parametrize("fields, param, words", [
    (dict(prompt=[1, 2, 3]), "prompt", "token ids"),
    (dict(prompt=["one", "two"]), "prompt", "several prompts"),
    (dict(echo=1), "echo", "true or false"),
    (dict(best_of=2), "best_of", "not supported"),
    (dict(suffix="end"), "suffix", "not supported"),
    (dict(extra_body={"messages": CHAT}), "messages", "not supported"),
])
def test_bad_completion_requests_name_the_field(api, fields, param, words):
    with pytest.raises(openai.BadRequestError) as caught:
        api.completions.create(**{"model": "base", "prompt": PROMPT, "max_tokens": 4, **fields})
    assert caught.value.body["param"] == param and words in caught.value.body["message"]


def test_malformed_bodies_are_400s_and_the_server_keeps_serving(server, api):
    for body, words in ((b"not json", "not valid JSON"), (b"[1, 2]", "JSON object"), (b"{}", "model is required"),
                        (b'{"model": "base"}', "messages is required")):
        request = urllib.request.Request(server.http_url + "/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request)
        assert caught.value.code == 400
        assert words in json.load(caught.value)["error"]["message"]
    assert api.chat.completions.create(model="base", messages=CHAT, max_tokens=2).usage.completion_tokens == 2


def test_a_body_over_the_size_limit_is_a_413_before_it_is_sent_and_the_server_keeps_serving(server, api):
    import http.client
    import urllib.parse

    # The server answers on the declared length alone; the client never has to send the 3 MiB.
    url = urllib.parse.urlsplit(server.http_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.putrequest("POST", url.path + "/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(3 * 2**20))
    connection.endheaders()
    reply = connection.getresponse()
    assert reply.status == 413
    assert "over 2097152 bytes" in json.load(reply)["error"]["message"]
    connection.close()
    assert api.chat.completions.create(model="base", messages=CHAT, max_tokens=2).usage.completion_tokens == 2


def test_draining_server_answers_503_while_running_calls_go_on(server, client, api):
    """SIGTERM: /health and new requests get 503 while a running gRPC call still streams.
    It stops the module's server, so it is the module's last test."""
    running = client.generate_stream("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,", max_tokens=200)
    next(running)
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while True:
        try:
            urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/health")
        except urllib.error.HTTPError as err:
            assert (err.code, json.load(err)) == (503, {"status": "draining"})
            break
        assert time.monotonic() < deadline, "/health never reported draining"
        time.sleep(0.05)
    with pytest.raises(openai.InternalServerError) as caught:
        api.completions.create(model="base", prompt=PROMPT, max_tokens=2)
    assert caught.value.status_code == 503 and "draining" in caught.value.body["message"]
    # The running call kept going past the refusals (the server's grace period is 5 s; under
    # load it may not reach its end, so only its progress is asserted).
    assert next(running).text
    running.close()
    assert server.process.wait(timeout=60) == 0
