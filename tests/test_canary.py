"""Canary releases: `cartridge release NAME@vN --canary PCT` splits a name's requests between the live version
and the canary by a stable hash of the routing key, the store's live pointer holds the split, and `serve
--store` follows it (a restart too); releasing the canary's version promotes it, `rollback` ends it.

The split's statistics are checked on the routing function itself (2,000 keys); the commands on a store of
small stand-in versions (they only read manifests); the serving end to end on random peft adapters written
through the store's API, with the real `cartridge release`/`rollback` commands and the real server.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.formats.store_layout import LiveMove, StoreError, VersionRef, read_live, release_log, routes_to_canary
from adapters.release.lifecycle import release
from adapters.formats.live_pointer import LiveMoved, move_live
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient, CartridgeError
from tests.conftest import PROMPT, start_server
from tests.release_helpers import FLAGS, KEYS, canary_share, http_post, move, refused, wait_for
from tests.test_release import cartridge
from tests.test_store_serving import store_random_version

def binomial_interval(n: int, p: float, mass: float) -> tuple[int, int]:
    """The central interval holding `mass` of Binomial(n, p), from its exact cumulative distribution."""
    cdf, total = [], 0.0
    for k in range(n + 1):
        total += math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                          + k * math.log(p) + (n - k) * math.log(1 - p))
        cdf.append(total)
    tail = (1 - mass) / 2
    low = next(k for k in range(n + 1) if cdf[k] > tail)
    high = next(k for k in range(n + 1) if cdf[k] >= 1 - tail)
    return low, high


def test_the_split_holds_its_share_and_keeps_each_key_on_one_version():
    rng = random.Random(20261206)
    keys = [f"{rng.getrandbits(64):016x}" for _ in range(2000)]
    at_10 = {k for k in keys if routes_to_canary("legal", 3, 10, k)}
    low, high = binomial_interval(2000, 0.10, 0.999)
    assert 150 < low < 160 and 240 < high < 250     # about 200 +- 3.3 standard deviations
    assert low <= len(at_10) <= high, f"{len(at_10)} of 2000 keys in a 10% canary"
    # Each key always lands on the same side, in another process too (sha256, not Python's salted hash).
    assert {k for k in keys if routes_to_canary("legal", 3, 10, k)} == at_10
    script = ("import sys; from adapters.formats.store_layout import routes_to_canary as r; "
              "print(''.join('1' if r('legal', 3, 10, k) else '0' for k in sys.argv[1:]))")
    other = subprocess.run([sys.executable, "-c", script, *keys[:300]], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert other.stdout.strip() == "".join("1" if k in at_10 else "0" for k in keys[:300])
    # Raising the share only adds keys; another canary version or name draws its own users.
    at_50 = {k for k in keys if routes_to_canary("legal", 3, 50, k)}
    assert at_10 < at_50 and binomial_interval(2000, 0.5, 0.999)[0] <= len(at_50) <= binomial_interval(2000, 0.5, 0.999)[1]
    assert {k for k in keys if routes_to_canary("legal", 4, 10, k)} != at_10
    assert {k for k in keys if routes_to_canary("medical", 3, 10, k)} != at_10


def stand_in_store(root: Path, versions: int = 3) -> AdapterStore:
    """`legal@v1..vN` holding one small file each: release, rollback and versions read only manifests."""
    store = AdapterStore(root)
    for i in range(versions):
        draft = store.draft("legal")
        (draft.path / "adapter_config.json").write_text(json.dumps({"i": i}))
        draft.commit(parent=None, record={"made_by": "tests: stand-in"})
    return store


def live_json(root: Path) -> dict:
    return json.loads((root / "legal" / "live.json").read_text())


def test_canary_commands_start_change_end_and_promote_in_the_store(tmp_path):
    root = tmp_path / "store"
    stand_in_store(root)
    refused(cartridge("release", "legal@v2", "--canary", "10", "--force", "--reason", "x", store=root), 1,
            "has no live version to split requests with")
    assert cartridge("release", "legal@v1", "--force", "--reason", "first", store=root).returncode == 0
    pointer = (root / "legal" / "live.json").read_bytes()

    # Every bad input: a one-line reason, a non-zero exit, and the pointer as it was.
    for share in ("0", "51", "ten", "-5", "12.5"):
        refused(cartridge("release", "legal@v2", f"--canary={share}", "--force", "--reason", "x", store=root), 2,
                "expected a whole percent from 1 to 50")
    refused(cartridge("release", "legal@v2", "--canary", "10", store=root), 1,
            "legal@v2 has no gate report against live legal@v1; run `cartridge gate legal@v2` first")
    refused(cartridge("release", "legal@v2", "--canary", "10", "--force", store=root), 1, "--force needs --reason")
    refused(cartridge("release", "legal@v1", "--canary", "10", "--force", "--reason", "x", store=root), 1,
            "legal@v1 is the live version; a canary must be another version")
    refused(cartridge("release", "legal@v9", "--canary", "10", "--force", "--reason", "x", store=root), 1,
            "legal@v9 is not in the store")
    assert (root / "legal" / "live.json").read_bytes() == pointer

    started = cartridge("release", "legal@v2", "--canary", "10", "--force", "--reason", "try v2", store=root)
    assert started.returncode == 0, started.stderr
    assert "legal: canary legal@v2 takes 10% of requests, live legal@v1 the rest (forced canary start" in started.stdout
    entry = live_json(root)
    assert entry["to_version"] == 1 and entry["canary"]["version"] == 2 and entry["canary"]["share"] == 10
    pointer = (root / "legal" / "live.json").read_bytes()

    refused(cartridge("release", "legal@v3", "--canary", "10", "--force", "--reason", "x", store=root), 1,
            "legal@v2 is already in a canary at 10%; one canary or shadow at a time")
    refused(cartridge("release", "legal@v2", "--canary", "10", "--force", "--reason", "x", store=root), 1,
            "legal@v2 already takes 10% of legal's requests")
    refused(cartridge("release", "legal@v3", "--force", "--reason", "x", store=root), 1,
            "legal@v2 is in a canary at 10%; promote it")
    refused(cartridge("release", "legal@v1", "--force", "--reason", "x", store=root), 1, "legal@v1 is already live")
    assert (root / "legal" / "live.json").read_bytes() == pointer

    raised = cartridge("release", "legal@v2", "--canary", "50", "--force", "--reason", "looks good", store=root)
    assert raised.returncode == 0 and "takes 50%" in raised.stdout, raised.stderr
    assert live_json(root)["canary"] == {**entry["canary"], "share": 50}      # the same entry, same start time
    listing = cartridge("versions", "legal", store=root).stdout.splitlines()
    assert listing[0].startswith("* v1") and listing[1].startswith("~ v2") and not listing[2].startswith(("*", "~"))
    assert f"canary: 50% since {entry['canary']['started_at']}" in listing[1] and "never live" in listing[1]

    ended = cartridge("rollback", "legal", "--reason", "v2 is worse", store=root)
    assert ended.returncode == 0, ended.stderr
    assert "legal: canary ended, live legal@v1 takes every request" in ended.stdout
    assert live_json(root)["canary"] is None and live_json(root)["to_version"] == 1

    # Promote: releasing the canary's version moves the live pointer and ends the split at once.
    assert cartridge("release", "legal@v2", "--canary", "10", "--force", "--reason", "again", store=root).returncode == 0
    promoted = cartridge("release", "legal@v2", "--force", "--reason", "ship it", store=root)
    assert promoted.returncode == 0 and "legal: live legal@v1 -> legal@v2 (forced canary promote" in promoted.stdout
    assert live_json(root)["canary"] is None and live_json(root)["to_version"] == 2
    assert [(m.action, m.from_version, m.to_version, m.canary_version) for m in release_log(AdapterStore(root), "legal")] \
        == [("forced release", None, 1, None), ("forced canary start", 1, 1, 2), ("forced canary change", 1, 1, 2),
            ("canary end", 1, 1, None), ("forced canary start", 1, 1, 2), ("forced canary promote", 1, 2, None)]
    listing = cartridge("versions", "legal", store=root).stdout.splitlines()
    assert listing[1].startswith("* v2") and listing[1].count(" to ") == 1 and " to now" in listing[1]
    assert listing[0].count(" to ") == 1 and " to now" not in listing[0], "canary moves are no live periods"

    # Without a canary, rollback keeps its meaning: back to the version live before (v1, not a canary move).
    back = cartridge("rollback", "legal", store=root)
    assert back.returncode == 0 and "legal: live legal@v2 -> legal@v1 (rollback" in back.stdout, back.stderr


def test_canary_moves_are_compare_and_set(tmp_path):
    store = stand_in_store(tmp_path)
    move_live(store, "legal", expected=None, to=1, action="forced release", gate_report_sha256=None, reason="x")
    canary = {"version": 2, "share": 10, "started_at": "now"}
    move_live(store, "legal", expected=1, to=1, action="forced canary start", gate_report_sha256=None, reason="x",
              canary=canary)
    before = (tmp_path / "legal" / "live.json").read_bytes()
    # Made while no canary ran (a release, a second canary): refused, nothing written.
    with pytest.raises(LiveMoved, match="the canary is now a canary of v2, while this forced release was made with no canary"):
        move_live(store, "legal", expected=1, to=3, action="forced release", gate_report_sha256=None, reason="x")
    with pytest.raises(LiveMoved, match="canary"):
        move_live(store, "legal", expected=1, to=1, action="forced canary start", gate_report_sha256=None,
                  reason="x", canary={**canary, "version": 3})
    assert (tmp_path / "legal" / "live.json").read_bytes() == before and len(release_log(store, "legal")) == 2
    assert read_live(store, "legal") == LiveMove(**json.loads(before))
    # A live pointer written before canaries existed reads as one without a split.
    (tmp_path / "legal" / "live.json").write_text(json.dumps({k: v for k, v in json.loads(before).items()
                                                               if k != "canary"}))
    assert read_live(store, "legal").canary is None
    for share in (0, 51, True, 10.5):    # the library refuses what the command line would
        with pytest.raises(StoreError, match="a canary takes 1 to 50 percent"):
            release(store, VersionRef("legal", 2), force=True, reason="x", canary=share)


# ---- through the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(base_model, tmp_path_factory) -> Path:
    """legal@v1..v4 (random peft adapters that answer differently), v1 live."""
    root = tmp_path_factory.mktemp("canary")
    for seed in (1, 2, 3, 4):
        store_random_version(AdapterStore(root), "legal", base_model, seed)
    assert cartridge("release", "legal@v1", "--force", "--reason", "first", store=root).returncode == 0
    return root


def answered(client: CartridgeClient, key: str, adapter: str = "legal"):
    return client.generate(PROMPT, adapter=adapter, max_tokens=6, routing_key=key)


def answered_all(client: CartridgeClient, keys: list[str]) -> list:
    """One request per key, all at once (batched like real traffic; one at a time took a minute)."""
    with ThreadPoolExecutor(len(keys)) as pool:
        return list(pool.map(lambda key: answered(client, key), keys))


def test_the_server_splits_by_key_survives_a_restart_and_follows_promote_and_rollback(store):
    expected = {k: "legal@v2" if routes_to_canary("legal", 2, 50, k) else "legal@v1" for k in KEYS}
    assert set(expected.values()) == {"legal@v1", "legal@v2"}, "the fixed keys must land on both sides"
    server = start_server("--store", str(store), *FLAGS)
    try:
        with CartridgeClient(server.address, timeout=120) as client:
            texts = {f"legal@v{n}": answered(client, "k", f"legal@v{n}").text for n in (1, 2, 3)}
            assert len(set(texts.values())) == 3, f"versions answer alike, the test would prove nothing: {texts}"
            move(store, "release", "legal@v2", "--canary", "10", "--force", "--reason", "try")
            wait_for(lambda: canary_share(server) == "10.0", "canary at 10%")
            move(store, "release", "legal@v2", "--canary", "50", "--force", "--reason", "more")
            wait_for(lambda: canary_share(server) == "50.0", "canary at 50%")

            # 40 requests, 2 per key: each key's answers from one version, the one the hash names.
            for key, reply in zip(KEYS * 2, answered_all(client, KEYS * 2)):
                assert (reply.adapter, reply.adapter_version) == ("legal", expected[key]), key
                assert reply.text == texts[expected[key]], key
            on_v2 = sum(v == "legal@v2" for v in expected.values())
            # A pin bypasses the split, whatever the key.
            v2_key = next(k for k in KEYS if expected[k] == "legal@v2")
            assert answered(client, v2_key, "legal@v1").adapter_version == "legal@v1"

            status, headers, body = http_post(server, {"model": "legal", "prompt": PROMPT, "max_tokens": 6,
                                                       "temperature": 0, "user": v2_key})
            assert status == 200 and headers["x-cartridge-adapter-version"] == "legal@v2", body
            assert body["model"] == "legal" and body["choices"][0]["text"] == texts["legal@v2"]

            # Bad routing keys are refused by name; the server keeps serving.
            with pytest.raises(CartridgeError) as err:
                answered(client, "k" * 257)
            assert err.value.code.name == "INVALID_ARGUMENT" and "routing_key must be at most 256" in err.value.message
            for user in (7, "u" * 257):
                status, _, body = http_post(server, {"model": "legal", "prompt": PROMPT, "max_tokens": 2, "user": user})
                assert status == 400 and "user" in body["error"]["message"], body

        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        # Per version: the pinned request and the HTTP one, and every request the split sent to it.
        assert f'cartridge_version_requests_total{{adapter="legal",version="v2"}} {1 + 2 * on_v2 + 1}.0' in metrics
        assert 'cartridge_canary_version{adapter="legal"} 2.0' in metrics
    finally:
        server.stop()

    # A restart reads the split from the store before it says it is ready.
    server = start_server("--store", str(store), *FLAGS)
    try:
        with CartridgeClient(server.address, timeout=120) as client:
            assert canary_share(server) == "50.0"
            assert {k: r.adapter_version for k, r in zip(KEYS, answered_all(client, KEYS))} == expected

            move(store, "release", "legal@v2", "--force", "--reason", "promote")
            wait_for(lambda: canary_share(server) is None and answered(client, "k").adapter_version == "legal@v2",
                     "the promotion")
            assert {r.adapter_version for r in answered_all(client, KEYS)} == {"legal@v2"}

            move(store, "release", "legal@v3", "--canary", "50", "--force", "--reason", "try v3")
            wait_for(lambda: canary_share(server) == "50.0", "the canary of v3")
            assert {r.adapter_version for r in answered_all(client, KEYS)} == {"legal@v2", "legal@v3"}
            move(store, "rollback", "legal", "--reason", "v3 is worse")
            wait_for(lambda: canary_share(server) is None, "the canary's end")
            replies = answered_all(client, KEYS)
            assert {(r.adapter_version, r.text) for r in replies} == {("legal@v2", texts["legal@v2"])}

            # A canary whose files fail their check on the server (changed after the pointer moved) takes
            # no requests: counted, logged, the live version keeps every key.
            weights = store / "legal" / "v4" / "adapter_model.safetensors"
            data = weights.read_bytes()
            weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            refused(cartridge("release", "legal@v4", "--canary", "50", "--force", "--reason", "x", store=store), 1,
                    "v4/adapter_model.safetensors does not match its sha256")
            move_live(AdapterStore(store), "legal", expected=2, to=2, action="forced canary start",
                      gate_report_sha256=None, reason="test", canary={"version": 4, "share": 50, "started_at": "t"})
            wait_for(lambda: 'cartridge_store_load_failures_total{adapter="legal"} 1.0' in
                     urllib.request.urlopen(server.metrics_url).read().decode(), "the failed canary")
            assert canary_share(server) is None
            assert {r.adapter_version for r in answered_all(client, KEYS)} == {"legal@v2"}
            assert server.logged("not starting the canary legal@v4")
    finally:
        server.stop()
