"""Scale-out on Ray Serve: `cartridge serve-ray` with 2 replicas of the default model on this CPU.

Requests for 8 adapters with Zipf popularity go in through Ray's HTTP proxy (the `openai` package)
and Ray's gRPC proxy (our own proto); every answer says which replica served it and whether that
replica already held the adapter. Then one replica's process is killed mid-run: the other keeps
serving and Ray starts a replacement.
"""
from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import openai
import psutil
import pytest
from transformers import AutoConfig

from cartridge.v1 import inference_pb2, inference_pb2_grpc

from .bench.serve_bench import write_random_adapter
from .conftest import PROMPT, launch, stop_process

pytestmark = pytest.mark.slow
ADAPTERS = [f"zipf-{i}" for i in range(8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RayServer:
    process: subprocess.Popen
    http_url: str
    grpc_address: str
    log: list[str]               # everything the cluster printed, replicas' log lines included

    def stop(self) -> None:
        stop_process(self.process)


def start_serve_ray(*flags: str) -> RayServer:
    """`cartridge serve-ray` with 2 small replicas of the default model on free ports; waits for its ready line."""
    http_port, grpc_port = free_port(), free_port()
    command = [sys.executable, "-m", "client.cli", "serve-ray", "--replicas", "2", *flags,
               "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--max-batch-size", "4",
               "--max-seq-len", "256", "--max-adapters", "3", "--max-lora-rank", "8"]
    process, lines, _ = launch(command, "cartridge: Ray Serve with", 240, env={"RAY_DEDUP_LOGS": "0"})
    return RayServer(process, f"http://127.0.0.1:{http_port}/v1", f"127.0.0.1:{grpc_port}", lines)


@pytest.fixture(scope="module")
def ray_server(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter-root")
    config = AutoConfig.from_pretrained(base_dir)
    for i, name in enumerate(ADAPTERS):
        write_random_adapter(root / name, config, rank=4, seed=i)
    server = start_serve_ray("--adapter-root", str(root))
    yield server.process, server.http_url, server.grpc_address
    server.stop()


def replica_processes(process: subprocess.Popen) -> list[psutil.Process]:
    """The engine replicas' worker processes, found in the server's own process tree."""
    found = []
    for child in psutil.Process(process.pid).children(recursive=True):
        try:
            if "CartridgeReplica" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


class Answer(NamedTuple):
    replica: str      # which replica served it, as the answer says
    cache: str        # hit: that replica already held the adapter; miss: it loaded it for this request
    text: str


class Caller:
    """Sends one greedy request for an adapter through HTTP or gRPC."""

    def __init__(self, http_url: str, grpc_address: str, max_tokens: int = 6):
        self.api = openai.OpenAI(base_url=http_url, api_key="unused", max_retries=0, timeout=120)
        self.channel = grpc.insecure_channel(grpc_address)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.max_tokens = max_tokens

    def http(self, adapter: str) -> Answer:
        raw = self.api.completions.with_raw_response.create(model=adapter, prompt=PROMPT, max_tokens=self.max_tokens,
                                                            temperature=0)
        answer = raw.parse()
        assert answer.usage.completion_tokens >= 1 and answer.model == adapter
        return Answer(raw.headers["x-cartridge-replica"], raw.headers["x-cartridge-adapter-cache"],
                      answer.choices[0].text)

    def grpc(self, adapter: str) -> Answer:
        request = inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=self.max_tokens)
        answer, call = self.stub.Generate.with_call(request, metadata=[("multiplexed_model_id", adapter)], timeout=120)
        assert answer.completion_tokens >= 1 and answer.adapter == adapter
        trailers = dict(call.trailing_metadata())
        return Answer(trailers["x-cartridge-replica"], trailers["x-cartridge-adapter-cache"], answer.text)

    def call(self, i: int, adapter: str) -> Answer:
        return (self.http if i % 2 else self.grpc)(adapter)


def zipf_adapters(count: int, seed: int) -> list[str]:
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ADAPTERS))]
    return random.Random(seed).choices(ADAPTERS, weights, k=count)


def random_routing_hit_share(requests: list[str], replicas: int, slots: int, trials: int = 1000) -> tuple[float, float]:
    """Mean and best hit share of the same requests routed at random to replicas with the same LRU
    caches: what affinity has to beat."""
    shares = []
    for trial in range(trials):
        rng, caches, hits = random.Random(trial), [OrderedDict() for _ in range(replicas)], 0
        for adapter in requests:
            cache = caches[rng.randrange(replicas)]
            hits += adapter in cache
            cache[adapter] = None
            cache.move_to_end(adapter)
            if len(cache) > slots:
                cache.popitem(last=False)
        shares.append(hits / len(requests))
    return sum(shares) / trials, max(shares)


def test_adapters_go_to_replicas_that_hold_them_and_a_killed_replica_is_replaced(ray_server):
    process, http_url, grpc_address = ray_server
    caller = Caller(http_url, grpc_address)

    # Both front doors agree with each other on an adapter's greedy text, and the base needs no adapter.
    text_http = caller.api.completions.create(model="zipf-0", prompt=PROMPT, max_tokens=8, temperature=0)
    text_grpc = caller.stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=8, adapter="zipf-0"),
                                     metadata=[("multiplexed_model_id", "zipf-0")], timeout=120)
    assert text_http.choices[0].text == text_grpc.text
    assert {m.id for m in caller.api.models.list()} >= set(ADAPTERS)
    with pytest.raises(openai.NotFoundError):
        caller.api.completions.create(model="not-in-the-store", prompt=PROMPT, max_tokens=2)
    with pytest.raises(grpc.RpcError) as refused:
        caller.stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=2, temperature=-1),
                             metadata=[("multiplexed_model_id", "zipf-1")], timeout=120)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in refused.value.details()

    # Phase 1: Zipf traffic, 4 callers at once, half HTTP, half gRPC. Nothing may fail.
    requests = zipf_adapters(48, seed=0)
    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(lambda job: caller.call(*job), enumerate(requests)))
    hits = sum(answer.cache == "hit" for answer in served)
    replicas = {answer.replica for answer in served}
    share = hits / len(served)
    holders = {}
    for adapter, answer in zip(requests, served):
        holders.setdefault(adapter, set()).add(answer.replica)
    random_mean, random_best = random_routing_hit_share(requests, replicas=2, slots=3)
    print(f"\naffinity: {hits}/{len(served)} = {share:.0%} of requests landed on a replica already holding "
          f"their adapter (random routing, same caches: {random_mean:.0%} mean, {random_best:.0%} best of 1000); "
          f"replicas per adapter {json.dumps({a: len(r) for a, r in sorted(holders.items())})}")
    assert len(replicas) == 2, "both replicas should serve"
    assert random_best < 0.6 <= share, "affinity should beat every random routing of the same requests"

    # Phase 2: kill one replica's process mid-run; the other keeps serving, Ray starts a new one.
    victims = replica_processes(process)
    assert len(victims) == 2
    rss = sum(p.memory_info().rss for p in psutil.Process(process.pid).children(recursive=True))
    print(f"process tree RSS {rss / 2**30:.2f} GiB; each replica "
          f"{', '.join(f'{p.memory_info().rss / 2**30:.2f}' for p in victims)} GiB")
    assert max(p.memory_info().rss for p in victims) < 4 * 2**30
    victims[0].send_signal(signal.SIGKILL)
    killed_at, failures, served_during, new_replica = time.monotonic(), 0, 0, None
    traffic = iter(zipf_adapters(400, seed=1))
    while new_replica is None:
        assert time.monotonic() - killed_at < 150, "no replacement replica served within 150 s"
        adapter = next(traffic)
        try:
            replica = caller.call(served_during, adapter).replica
        except (openai.APIError, grpc.RpcError):
            failures += 1           # in flight on, or routed to, the killed replica before Ray noticed
            continue
        served_during += 1
        if replica not in replicas:
            new_replica = replica
    print(f"replacement served after {time.monotonic() - killed_at:.0f} s; {served_during} requests served "
          f"meanwhile, {failures} failed (sent to the killed replica)")
    assert served_during > 1, "the surviving replica should have served while the other was replaced"
    assert failures <= 4
    assert len(replica_processes(process)) == 2


def test_an_evicted_adapter_is_dropped_only_after_its_last_request():
    """Ray's LRU evicts by calling __del__ whatever still runs; the drop waits for the last user."""
    from server.ray.app import ResidentAdapter

    dropped = []
    adapter = ResidentAdapter("sql", dropped.append)
    adapter.acquire()
    adapter.acquire()
    adapter.__del__()                   # Ray's eviction, two requests still running on it
    adapter.done()
    assert dropped == []
    adapter.done()                      # the last one ends: now it goes
    assert dropped == [adapter]
    adapter.__del__()                   # Python's own collection later: nothing more
    idle = ResidentAdapter("idle", dropped.append)
    idle.__del__()                      # evicted with nobody on it: at once
    assert dropped == [adapter, idle]
