"""A deliberately small server: one decode slot, one queued request, one adapter on the device."""
from __future__ import annotations

import re
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from client.client import CartridgeClient, CartridgeError

from .conftest import PROMPT

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"   # the base model keeps counting: a request that runs long


@pytest.fixture(scope="module")
def server_flags(adapter_dirs) -> list[str]:
    return ["--http-port", "0", "--max-batch-size", "1", "--max-queue", "1", "--max-adapters", "1", "--max-lora-rank", "16",
            "--max-seq-len", "400", "--adapter", f"qv8={adapter_dirs['qv8']}", "--adapter", f"mlp4={adapter_dirs['mlp4']}"]


def cancelled_count(server) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    found = re.search(r'^cartridge_requests_total\{adapter="",finish_reason="cancelled"\} (\S+)', text, re.M)
    return float(found[1]) if found else 0.0


def gauge(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    return float(re.search(rf"^{name} (\S+)", text, re.M)[1])


def test_full_queue_is_resource_exhausted_and_a_cancel_frees_the_slot(client, server):
    before = cancelled_count(server)
    running = client.generate_stream(COUNTING, max_tokens=350)
    next(running)                                       # holds the only decode slot
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.generate, COUNTING, max_tokens=5)
        deadline = time.monotonic() + 10
        while gauge(server, "cartridge_requests_waiting") < 1:   # takes the one place in the queue
            assert time.monotonic() < deadline, "the second request never queued"
            time.sleep(0.02)
        with pytest.raises(CartridgeError) as err:
            client.generate(PROMPT, max_tokens=2)
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue is full" in err.value.message
        running.close()                                 # cancels the long request
        assert waiting.result().completion_tokens == 5  # got the freed slot long before 350 tokens
    assert cancelled_count(server) == before + 1
    assert client.generate(PROMPT, max_tokens=3).completion_tokens == 3


def test_http_full_queue_is_429_and_a_client_timeout_frees_the_slot(client, server):
    import openai

    api = openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120)
    running = client.generate_stream(COUNTING, max_tokens=350)
    next(running)                                       # holds the only decode slot
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(api.completions.create, model="base", prompt=COUNTING, max_tokens=5, temperature=0)
        deadline = time.monotonic() + 10
        while gauge(server, "cartridge_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the HTTP request never queued"
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as err:
            api.completions.create(model="base", prompt=PROMPT, max_tokens=2)
        assert err.value.status_code == 429 and "queue is full" in err.value.body["message"]
        running.close()
        assert waiting.result().usage.completion_tokens == 5
    before = cancelled_count(server)
    with pytest.raises(openai.APITimeoutError):
        api.with_options(timeout=0.5).completions.create(model="base", prompt=COUNTING, max_tokens=350)
    deadline = time.monotonic() + 10
    while cancelled_count(server) < before + 1:        # the server saw the caller leave and freed the slot
        assert time.monotonic() < deadline, "the abandoned HTTP request was never cancelled"
        time.sleep(0.05)
    assert api.completions.create(model="base", prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_expired_deadline_frees_the_slot(server):
    before = cancelled_count(server)
    with CartridgeClient(server.address, timeout=0.5) as hurried:
        with pytest.raises(CartridgeError) as err:
            hurried.generate(COUNTING, max_tokens=350)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    with CartridgeClient(server.address, timeout=30) as patient:
        assert patient.generate(PROMPT, max_tokens=3).completion_tokens == 3
    assert cancelled_count(server) == before + 1


def test_adapters_take_turns_in_one_device_slot(client):
    """More registered adapters than device slots: each is loaded when needed, with the right weights."""
    first = client.generate(PROMPT, adapter="qv8", max_tokens=12).text
    other = client.generate(PROMPT, adapter="mlp4", max_tokens=12).text
    again = client.generate(PROMPT, adapter="qv8", max_tokens=12).text
    assert first == again != other


def test_replace_swaps_weights_for_new_requests(client, adapter_dirs):
    mlp4 = client.generate(PROMPT, adapter="mlp4", max_tokens=12).text
    info = client.register_adapter("qv8", str(adapter_dirs["mlp4"]), replace=True)
    assert info.rank == 4
    assert client.generate(PROMPT, adapter="qv8", max_tokens=12).text == mlp4
    client.register_adapter("qv8", str(adapter_dirs["qv8"]), replace=True)


def test_router_metrics_show_running_and_waiting_adapters(client, server):
    """What the endpoint picker reads: queue, KV-cache use, and which adapters run and wait."""
    running = client.generate_stream(COUNTING, adapter="qv8", max_tokens=350)
    next(running)                                       # qv8 holds the only decode slot and adapter slot
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(client.generate, PROMPT, adapter="mlp4", max_tokens=2)
        deadline = time.monotonic() + 10
        while gauge(server, "cartridge_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the mlp4 request never queued"
            time.sleep(0.02)
        text = urllib.request.urlopen(server.metrics_url).read().decode()
        running.close()
        assert waiting.result().completion_tokens == 2
    assert re.search(r"^cartridge_requests_running 1\.0$", text, re.M)
    assert float(re.search(r"^cartridge_kv_cache_usage_ratio (\S+)$", text, re.M)[1]) > 0   # the running one's blocks
    assert float(re.search(r"^cartridge_kv_cache_blocks_in_use (\S+)$", text, re.M)[1]) >= 1
    info = re.search(r"^cartridge_lora_requests_info\{(.*)\} (\S+)$", text, re.M)
    assert dict(re.findall(r'(\w+)="([^"]*)"', info[1])) == \
        {"running_lora_adapters": "qv8", "waiting_lora_adapters": "mlp4", "max_lora": "1"}
    assert abs(float(info[2]) - time.time()) < 60      # when the engine last saw a change, as vLLM's
    deadline = time.monotonic() + 10
    while gauge(server, "cartridge_kv_cache_usage_ratio") != 0:   # all finished: the cache is free again
        assert time.monotonic() < deadline
        time.sleep(0.05)
