"""`cartridge serve-ray --store`: every replica serves the store's live version of a name, and a release
or rollback reaches every replica that holds the name, while requests run; `name@vN` pins a version.

Two versions of one adapter (small random peft adapters written with the store's API), 2 replicas of
the default model on this CPU, the real `cartridge release` and `rollback` commands, and requests
through both of Ray's proxies (the `openai` package over HTTP, our proto over gRPC).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import openai
import pytest

from adapters.formats.store_layout import live_file
from adapters.store.versions import AdapterStore

from .test_ray_serve import Answer, Caller, start_serve_ray
from .test_store_serving import release, store_random_version

pytestmark = pytest.mark.slow
BURST = 8              # concurrent requests: more than one replica's max_ongoing_requests (5), so Ray spreads them
SWITCH_S = 1.0         # pointer moved -> the replica serves the new version (its own log line)
ANSWER_S = 8.0         # pointer moved -> a v2 answer from every replica holding the name, requests' own time included


@pytest.fixture(scope="module")
def store(base_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-store")
    for seed in (1, 2):
        store_random_version(AdapterStore(root), "legal", base_model, seed)
    release(root, "legal@v1")
    return root


@pytest.fixture(scope="module")
def ray_store_server(store):
    server = start_serve_ray("--store", str(store))
    yield server
    server.stop()


def burst(caller: Caller, adapter: str) -> list[tuple[Answer, float]]:
    """BURST requests at once, half over each proxy; each answer with the wall time it came back."""
    def one(i: int) -> tuple[Answer, float]:
        answer = caller.call(i, adapter)
        return answer, time.time()
    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(one, range(BURST)))


def follow(caller: Caller, store: Path, old: str, new: str, holders: set[str]) -> dict[str, float]:
    """Bursts for `legal` until every holder answers `new`; per replica, seconds from the pointer's move to
    its first `new` answer. Every answer is one version's whole text, and a replica never goes back."""
    moved_at = live_file(AdapterStore(store), "legal").stat().st_mtime
    switched: dict[str, float] = {}
    while set(switched) < holders:
        assert time.time() - moved_at < 30, f"replicas {holders - set(switched)} still answer the old version"
        before = set(switched)   # this burst started after these replicas had switched
        for answer, at in burst(caller, "legal"):
            assert answer.text in (old, new), f"neither version's text: {answer.text!r}"
            assert answer.text == new or answer.replica not in before, f"{answer.replica} went back to the old version"
            if answer.text == new:
                switched.setdefault(answer.replica, at - moved_at)
    return switched


def switch_lags(log: list[str], ref: str) -> list[float]:
    """Each replica's own figure: pointer moved -> it serves `ref` (its `now serving` log line)."""
    return [float(found[1]) for line in log
            if (found := re.search(rf"now serving {ref} \(\w[\w ]*\), (\d+\.\d+) s after the pointer moved", line))]


def test_a_release_reaches_every_replica_and_a_version_can_be_pinned(store, ray_store_server):
    caller = Caller(ray_store_server.http_url, ray_store_server.grpc_address, max_tokens=8)
    v1 = caller.grpc("legal@v1").text
    v2 = caller.http("legal@v2").text
    assert v1 != v2, "the two versions answer alike: the test would prove nothing"
    assert caller.http("legal").text == v1 and caller.grpc("legal").text == v1
    with pytest.raises(openai.NotFoundError, match="legal@v9 is not in the store"):
        caller.http("legal@v9")
    with pytest.raises(grpc.RpcError) as refused:
        caller.grpc("unknown")
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND and "no live version" in refused.value.details()

    # Hold `legal` on both replicas: a burst overflows one replica, and Ray sends the rest to the other.
    holders: set[str] = set()
    started = time.monotonic()
    while len(holders) < 2:
        assert time.monotonic() - started < 60, "Ray kept `legal` on one replica"
        answers = burst(caller, "legal")
        assert {answer.text for answer, _ in answers} == {v1}
        holders |= {answer.replica for answer, _ in answers}

    release(store, "legal@v2")
    to_v2 = follow(caller, store, v1, v2, holders)
    assert caller.grpc("legal@v1").text == v1 and caller.http("legal@v1").text == v1   # pinned: still v1

    rolled = subprocess.run([sys.executable, "-m", "client.cli", "rollback", "legal", "--store", str(store)],
                            capture_output=True, text=True, timeout=120)
    assert rolled.returncode == 0, rolled.stderr
    back_to_v1 = follow(caller, store, v2, v1, holders)

    time.sleep(0.5)   # the replicas' log lines travel through Ray's log monitor
    lags = {ref: switch_lags(ray_store_server.log, ref) for ref in ("legal@v2", "legal@v1")}
    print(f"\nrelease legal@v2: replicas switched {lags['legal@v2']} s after the pointer moved; first v2 answer "
          f"per replica {sorted(round(s, 2) for s in to_v2.values())} s (request time included)"
          f"\nrollback to legal@v1: switched {lags['legal@v1'][-2:]} s; first v1 answer "
          f"{sorted(round(s, 2) for s in back_to_v1.values())} s")
    assert len(lags["legal@v2"]) == 2 and max(lags["legal@v2"]) < SWITCH_S
    assert len(lags["legal@v1"]) >= 2 and max(lags["legal@v1"][-2:]) < SWITCH_S
    assert max(to_v2.values()) < ANSWER_S and max(back_to_v1.values()) < ANSWER_S
