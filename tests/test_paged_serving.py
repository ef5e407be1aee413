"""The paged KV cache through the real server: chunked prefill, preemption and the prefix cache change
no output, the prefix cache never serves keys and values computed under other weights, and a long prompt
does not stall running streams."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from adapters.store.versions import AdapterStore
from cartridge.v1 import inference_pb2, inference_pb2_grpc
from client.client import CartridgeClient

from .conftest import PROMPT, start_server
from .test_store_serving import release, store_random_version

PROMPTS = [PROMPT, "Write a haiku about the sea.", "List three prime numbers:",
           "The best way to learn Python is to read code, write code, and read the code you wrote again because"]
ADAPTERS = ["qv8", "all16-rs", "", "qv8"]      # mixed adapters, and the base, in the same passes
# Small blocks, so that short prompts fill whole blocks (what the prefix cache keeps) and cross their edges.
BLOCKS = ["--kv-block-size", "4", "--max-seq-len", "256", "--max-lora-rank", "16", "--max-adapters", "4"]


def metric(server, name: str) -> float:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(found[1]) if found else 0.0


def greedy_reference(base_model, tokenizer, adapter_dir, prompt: str, max_tokens: int) -> str:
    """transformers' (and peft's) greedy text, ending at the end-of-sequence token as the server does."""
    from peft import PeftModel

    model = base_model if adapter_dir is None else PeftModel.from_pretrained(base_model, adapter_dir).eval()
    try:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    finally:
        if adapter_dir is not None:
            model.unload()  # peft injects layers into base_model in place; take them out again


@pytest.fixture(scope="module")
def references(base_model, tokenizer, adapter_dirs) -> list[str]:
    return [greedy_reference(base_model, tokenizer, adapter_dirs.get(a), p, 10) for p, a in zip(PROMPTS, ADAPTERS)]


def adapter_flags(adapter_dirs, *names: str) -> list[str]:
    return [flag for name in names for flag in ("--adapter", f"{name}={adapter_dirs[name]}")]


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_greedy_text_is_transformers_at_every_chunk_size(adapter_dirs, references, chunk):
    """--max-tokens-per-pass sets how much of a prompt a pass takes beside the decode rows (1: none beside)."""
    server = start_server("--max-tokens-per-pass", str(chunk), "--max-batch-size", "8", *BLOCKS,
                          *adapter_flags(adapter_dirs, "qv8", "all16-rs"))
    try:
        with CartridgeClient(server.address, timeout=300) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
            texts = list(pool.map(lambda pa: client.generate(pa[0], adapter=pa[1], max_tokens=10).text,
                                  zip(PROMPTS, ADAPTERS)))
    finally:
        server.stop()
    assert texts == references


def test_preempted_requests_finish_with_the_text_they_have_alone(adapter_dirs, base_dir):
    """A KV cache of 24 blocks of 4 tokens for 64 streams of about 20 tokens: requests are preempted and
    computed again, and every one ends as it does unpreempted, greedy (base or adapter) or seeded (base): a
    seeded request draws from its generator only when it samples, so recomputing draws nothing. The
    unpreempted answers come four at a time (at most 24 blocks: none is preempted, as the counter checks);
    a row's answer does not depend on the rows beside it (test_serve)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    block_bytes = 2 * config.num_hidden_layers * 4 * config.num_key_value_heads * config.head_dim * 4
    server = start_server("--kv-block-size", "4", "--kv-cache-memory", str(24 * block_bytes), "--max-seq-len", "48",
                          "--max-batch-size", "8", "--max-lora-rank", "16", *adapter_flags(adapter_dirs, "qv8"))
    requests = [dict(prompt=f"Count on: {i}, {i + 1}, {i + 2},", adapter="qv8" if i % 2 else "",
                     max_tokens=6, **(dict(temperature=0.8, seed=i) if i % 4 == 2 else {})) for i in range(64)]
    try:
        with CartridgeClient(server.address, timeout=600) as client:
            with ThreadPoolExecutor(4) as pool:
                alone = list(pool.map(lambda r: client.generate(**r), requests))
            assert metric(server, "cartridge_preemptions_total") == 0
            with ThreadPoolExecutor(len(requests)) as pool:
                together = list(pool.map(lambda r: client.generate(**r), requests))
            preemptions = metric(server, "cartridge_preemptions_total")
    finally:
        server.stop()
    assert preemptions > 0, "nothing was preempted: the test proves nothing"
    assert server.logged("preempted request")
    assert [a.finish_reason for a in together] == [a.finish_reason for a in alone]
    assert [a.text for a in together] == [a.text for a in alone]


@pytest.fixture(scope="module")
def cached_server(adapter_dirs):
    proc = start_server("--max-batch-size", "4", *BLOCKS, *adapter_flags(adapter_dirs, "qv8", "all16-rs"))
    yield proc
    proc.stop()


LONG = PROMPT + " Light, water and soil. Light comes first, because without it nothing grows at all."
HITS = "cartridge_prefix_cache_hit_tokens_total"


def test_a_prefix_cache_hit_gives_the_tokens_of_a_miss_and_adapters_never_share_blocks(cached_server, base_model,
                                                                                        tokenizer, adapter_dirs):
    with CartridgeClient(cached_server.address, timeout=300) as client:
        before = metric(cached_server, HITS)
        miss = client.generate(LONG, adapter="qv8", max_tokens=12).text
        assert metric(cached_server, HITS) == before
        hit = client.generate(LONG, adapter="qv8", max_tokens=12).text
        found = metric(cached_server, HITS) - before
        assert found >= len(tokenizer.encode(LONG)) - 4, "the whole blocks of the prompt should have been found"
        assert hit == miss
        extended = client.generate(LONG + " Then water.", adapter="qv8", max_tokens=8).text   # a shared prefix
        assert metric(cached_server, HITS) - before > found
        assert extended == greedy_reference(base_model, tokenizer, adapter_dirs["qv8"], LONG + " Then water.", 8)
        before = metric(cached_server, HITS)
        other = client.generate(LONG, adapter="all16-rs", max_tokens=12).text
        base = client.generate(LONG, max_tokens=12).text
        assert metric(cached_server, HITS) == before, "another adapter, or the base, found qv8's blocks"
    assert other == greedy_reference(base_model, tokenizer, adapter_dirs["all16-rs"], LONG, 12)
    assert base == greedy_reference(base_model, tokenizer, None, LONG, 12)
    assert len({miss, other, base}) == 3, "the adapters answer alike: the test would prove nothing"
    assert metric(cached_server, "cartridge_prefix_cache_blocks") > 0


def test_choices_fork_the_prompts_blocks_and_each_gives_the_single_answer(cached_server):
    """n = 6 on a server of 4 rows: the other choices wait until the first has computed its prompt, then take
    its blocks (or, once rows free after it ended, run alone); each greedy, penalised choice gives the n = 1
    answer, and its first streamed message the prompt logprobs of the n = 1 request."""
    fields = dict(prompt=LONG, adapter="qv8", max_tokens=10, temperature=0, frequency_penalty=0.8,
                  prompt_logprobs=True)
    with grpc.insecure_channel(cached_server.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        single = stub.Generate(inference_pb2.GenerateRequest(**fields))
        answer = stub.Generate(inference_pb2.GenerateRequest(n=6, **fields))
        prompts = {}
        for message in stub.GenerateStream(inference_pb2.GenerateRequest(n=6, **fields)):
            if message.prompt_logprobs:
                prompts[message.choice_index] = message.prompt_logprobs
    assert [c.text for c in answer.choices] == [single.text] * 6
    assert sorted(prompts) == list(range(6))
    for logprobs in prompts.values():
        assert [t.token_id for t in logprobs] == [t.token_id for t in single.prompt_logprobs]
        assert [t.logprob for t in logprobs[1:]] == pytest.approx([t.logprob for t in single.prompt_logprobs[1:]],
                                                                  abs=1e-4)


def test_a_replaced_adapter_never_gets_blocks_of_its_earlier_weights(cached_server, base_model, tokenizer,
                                                                      adapter_dirs):
    with CartridgeClient(cached_server.address, timeout=300) as client:
        client.register_adapter("swap", str(adapter_dirs["qv8"]))
        before = metric(cached_server, HITS)
        assert client.generate(LONG, adapter="swap", max_tokens=12).text == \
            client.generate(LONG, adapter="qv8", max_tokens=12).text
        assert metric(cached_server, HITS) > before, "the same weights under another name may share blocks"
        client.register_adapter("swap", str(adapter_dirs["mlp4"]), replace=True)
        before = metric(cached_server, HITS)
        swapped = client.generate(LONG, adapter="swap", max_tokens=12).text
        assert metric(cached_server, HITS) == before, "blocks computed under the replaced weights were served"
        client.unregister_adapter("swap")
    assert swapped == greedy_reference(base_model, tokenizer, adapter_dirs["mlp4"], LONG, 12)


def test_release_and_rollback_never_serve_blocks_of_other_versions(base_model, tokenizer, tmp_path):
    store = AdapterStore(tmp_path)
    versions = [store_random_version(store, "legal", base_model, seed) for seed in (1, 2)]
    release(tmp_path, "legal@v1")
    server = start_server("--store", str(tmp_path), "--max-adapters", "3", "--max-batch-size", "4", *BLOCKS[:4])

    def live(client: CartridgeClient, number: int) -> str:
        deadline = time.monotonic() + 10
        while next(a for a in client.list_adapters() if a.name == "legal" and a.live).version != number:
            assert time.monotonic() < deadline, f"legal@v{number} never went live"
            time.sleep(0.01)
        before = metric(server, HITS)
        text = client.generate(PROMPT, adapter="legal", max_tokens=12).text
        live.found = metric(server, HITS) - before
        return text

    try:
        with CartridgeClient(server.address, timeout=300) as client:
            first = live(client, 1)
            release(tmp_path, "legal@v2")
            second = live(client, 2)
            assert live.found == 0, "blocks computed under v1 were served to v2"
            done = subprocess.run([sys.executable, "-m", "client.cli", "rollback", "legal", "--reason", "test",
                                   "--store", str(tmp_path)], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            third = live(client, 1)
            assert live.found > 0, "v1's own blocks may be found again"
    finally:
        server.stop()
    assert second == greedy_reference(base_model, tokenizer, versions[1].path, PROMPT, 12) != first
    assert third == first


COUNTING = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"   # the base model keeps counting: a piece a token


def test_a_long_prompt_does_not_stall_running_streams():
    """Eight streams decode while a prompt of about 440 tokens arrives: with 16 tokens a pass, the prompt takes
    8 a pass beside them, and no stream's gap between two tokens passes twice its median gap (a 700-token prompt
    computed whole in one pass held them 29 median gaps on the development CPU). A timing property on a shared
    CPU: one of three tries must hold it."""
    server = start_server("--max-tokens-per-pass", "16", "--max-batch-size", "16", "--max-seq-len", "1024")
    try:
        with CartridgeClient(server.address, timeout=300) as client:
            ratios = []
            while len(ratios) < 3 and not any(r <= 2.0 for r in ratios):
                # a new prompt each try: the same one would be found in the prefix cache and cost nothing
                ratios.append(stall_ratio(client, f"Try {len(ratios)}: " + " ".join(f"item {i}," for i in range(90))))
    finally:
        server.stop()
    assert min(ratios) <= 2.0, ratios


def stall_ratio(client: CartridgeClient, long_prompt: str) -> float:
    """The largest max-gap / median-gap of eight streams over the time all run while `long_prompt` is computed."""
    times: list[list[float]] = [[] for _ in range(8)]

    def stream(i: int) -> None:
        for piece in client.generate_stream(COUNTING, max_tokens=90):
            times[i].append(time.monotonic())

    with ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(stream, i) for i in range(8)]
        while min(len(t) for t in times) < 5:
            time.sleep(0.01)
        start = time.monotonic()
        client.generate(long_prompt, max_tokens=1)
        end = time.monotonic()
        for s in streams:
            s.result()
    assert all(t[-1] > end for t in times), "a stream ended before the long prompt did: make them longer"
    ratios = []
    for t in times:
        window = [b - a for a, b in zip(t, t[1:]) if b >= start and a <= end]
        ratios.append(max(window) / sorted(window)[len(window) // 2])
    if os.environ.get("SHOW_GAPS"):
        t = times[ratios.index(max(ratios))]
        print([round(1000 * (b - a)) for a, b in zip(t, t[1:]) if b >= start and a <= end])
    return max(ratios)
