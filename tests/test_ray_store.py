"""`cartridge serve-ray --store`: every replica serves the store's live version of a name, and a release
or rollback reaches every replica that holds the name, while requests run; `name@vN` pins a version.
A canary splits alike on every replica, a rating reaches the replica that gave the answer, and the
application's /metrics (what `cartridge canary` reads) sums every replica.

Two versions of one adapter (small random peft adapters written with the store's API), 2 replicas of
the default model on this CPU, the real `cartridge release`, `rollback` and `canary` commands, and requests
through both of Ray's proxies (the `openai` package over HTTP, our proto over gRPC).
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import grpc
import openai
import pytest

from adapters.formats.store_layout import live_file, routes_to_canary
from adapters.formats.version_stats import VersionSample, read_samples
from adapters.store.versions import AdapterStore
from cartridge.v1 import inference_pb2

from .conftest import PROMPT
from .release_helpers import http_post, move
from .test_canary import binomial_interval
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


def hold_on_both(caller: Caller, text: str) -> set[str]:
    """Bursts for `legal` until both replicas hold it (a burst overflows one replica, and Ray sends the rest to
    the other), every answer `text`; the two replicas."""
    holders: set[str] = set()
    started = time.monotonic()
    while len(holders) < 2:
        assert time.monotonic() - started < 60, "Ray kept `legal` on one replica"
        answers = burst(caller, "legal")
        assert {answer.text for answer, _ in answers} == {text}
        holders |= {answer.replica for answer, _ in answers}
    return holders


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

    holders = hold_on_both(caller, v1)
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


CANARY_SHARE = 30
KEYS = [f"user-{i}" for i in range(40)]


class Keyed(NamedTuple):
    key: str
    replica: str
    version: str      # name@vN, as the answer says
    id: str           # what a rating of the answer is given


def keyed(caller: Caller, i: int) -> Keyed:
    """`legal` for KEYS[i // 2], over HTTP (the OpenAI `user`) or gRPC (`routing_key`) by turns."""
    key = KEYS[i // 2]
    if i % 2:
        raw = caller.api.completions.with_raw_response.create(model="legal", prompt=PROMPT, max_tokens=1,
                                                              temperature=0, user=key)
        return Keyed(key, raw.headers["x-cartridge-replica"], raw.headers["x-cartridge-adapter-version"],
                     raw.parse().id)
    answer, call = caller.stub.Generate.with_call(
        inference_pb2.GenerateRequest(prompt=PROMPT, max_tokens=1, routing_key=key),
        metadata=[("multiplexed_model_id", "legal")], timeout=120)
    return Keyed(key, dict(call.trailing_metadata())["x-cartridge-replica"], answer.adapter_version, answer.request_id)


def scrape(server) -> str:
    try:
        with urllib.request.urlopen(server.http_url.removesuffix("/v1") + "/metrics", timeout=60) as page:
            return page.read().decode()
    except urllib.error.HTTPError as err:
        raise AssertionError(f"/metrics: {err.code} {err.read().decode()}") from None


def test_every_replica_splits_a_canary_alike_and_ratings_reach_the_replica_that_answered(store, ray_store_server):
    caller = Caller(ray_store_server.http_url, ray_store_server.grpc_address, max_tokens=1)
    replicas = hold_on_both(caller, caller.http("legal@v1").text)
    started = lambda: sum(f"legal: canary legal@v2 takes {CANARY_SHARE}% of requests" in line
                          for line in ray_store_server.log)
    before = read_samples([scrape(ray_store_server)], "legal")[0]
    move(store, "release", "legal@v2", "--canary", str(CANARY_SHARE), "--force", "--reason", "ray")
    deadline = time.monotonic() + 10
    while started() < 2:
        assert time.monotonic() < deadline, "not every replica holding `legal` started the canary"
        time.sleep(0.1)

    # Each key twice, once a proxy, 8 at a time: more than a replica takes, so Ray spreads them over both.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: keyed(caller, i), range(2 * len(KEYS))))
    on = {key: "legal@v2" if routes_to_canary("legal", 2, CANARY_SHARE, key) else "legal@v1" for key in KEYS}
    assert [a.version for a in answers] == [on[a.key] for a in answers], "a replica split a key otherwise"
    served_by: dict[str, set[str]] = {}
    for a in answers:
        served_by.setdefault(a.key, set()).add(a.replica)
    on_both = [key for key, by in served_by.items() if by == replicas]
    assert len(on_both) >= 5, f"only {len(on_both)} keys reached both replicas: the test would show little"
    for version in ("legal@v1", "legal@v2"):
        assert {a.replica for a in answers if a.version == version} == replicas, f"{version} on one replica only"
    low, high = binomial_interval(len(KEYS), CANARY_SHARE / 100, 0.999)
    assert low <= sum(v == "legal@v2" for v in on.values()) <= high

    # A rating reaches the replica that answered, over either proxy, and is counted for the version that answered.
    rated, rated_on = {"v1": 0, "v2": 0}, set()
    for answer in {a.replica: a for a in answers if a.id.startswith("cmpl-")}.values():
        assert answer.id.endswith(f".{answer.replica}")
        status, _, body = http_post(ray_store_server, {"id": answer.id, "score": 1}, "/feedback")
        assert status == 200 and body["adapter_version"] == answer.version, body
        rated[answer.version.split("@")[1]] += 1
        rated_on.add(answer.replica)
    for answer in {a.replica: a for a in answers if a.id.startswith("req-")}.values():
        assert caller.stub.Feedback(inference_pb2.FeedbackRequest(request_id=answer.id, score=-1),
                                    timeout=60).adapter_version == answer.version
        rated[answer.version.split("@")[1]] += 1
        rated_on.add(answer.replica)
    assert rated_on == replicas
    some, on_replica = answers[0].id, answers[0].id.rpartition(".")[0]
    for rating, code, words in [({"id": on_replica + ".gone", "score": 1}, 404, "no longer running"),
                                ({"id": "cmpl-nope." + answers[0].replica, "score": 1}, 404, "is not among the answers"),
                                ({"id": on_replica, "score": 1}, 404, "was not answered through this Ray application"),
                                ({"id": some, "score": 2}, 400, "score must be a number from -1 to 1")]:
        status, _, refused = http_post(ray_store_server, rating, "/feedback")
        assert status == code and words in refused["error"]["message"], refused
    with pytest.raises(grpc.RpcError) as unknown:
        caller.stub.Feedback(inference_pb2.FeedbackRequest(request_id="req-nope.gone", score=1), timeout=60)
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND

    # The application's /metrics holds every replica's series: the sums count every answer and rating.
    page = scrape(ray_store_server)
    assert set(re.findall(r'replica="([^"]+)"', page)) == replicas
    after = read_samples([page], "legal")[0]
    for label, version in (("v1", "legal@v1"), ("v2", "legal@v2")):
        grown = after[label].minus(before.get(label, VersionSample()))
        assert grown.requests == sum(a.version == version for a in answers), label
        assert grown.ratings == rated[label], label
    shown = subprocess.run([sys.executable, "-m", "client.cli", "canary", "legal", "--url",
                            ray_store_server.http_url.removesuffix("/v1") + "/metrics"],
                           capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"legal: live v1 against canary {CANARY_SHARE}% v2 (2 servers, "), shown.stdout
    move(store, "rollback", "legal")
