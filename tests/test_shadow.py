"""Shadow releases: `cartridge release NAME@vN --shadow PCT` runs that share of the name's requests on vN too, in
the same batches; callers get the live answers alone, byte for byte, and the server records each pair (or
counts the shadow row shed when live rows needed its room).

A real server with 16 concurrent client streams; v2 is written with the same weights as v1 (the same seed), so
as a shadow it must agree with the live version on every greedy answer, and v3 with other weights must not.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from adapters.formats.store_layout import routes_to_canary
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient
from tests.conftest import start_server
from tests.release_helpers import canary_share, move, refused, wait_for
from tests.test_release import cartridge
from tests.test_store_serving import store_random_version

STREAMS = 16
KEYS = [f"user-{i}" for i in range(64)]
PROMPTS = ["The three most important things about gardening are", "A good lawyer always", "Rivers flow to",
           "The capital of France is"]
FLAGS = ["--max-adapters", "3", "--max-lora-rank", "8", "--max-seq-len", "256", "--max-batch-size", "24"]


@pytest.fixture(scope="module")
def store(base_model, tmp_path_factory) -> Path:
    """legal@v1 live; v2 the same weights as v1; v3 others."""
    root = tmp_path_factory.mktemp("shadow")
    for seed in (1, 1, 3):
        store_random_version(AdapterStore(root), "legal", base_model, seed)
    move(root, "release", "legal@v1", "--force", "--reason", "first")
    return root


def answers(server, keys: list[str] = KEYS) -> dict[str, str]:
    """Each key's greedy answer, 16 streams at once."""
    def ask(key: str) -> tuple[str, str]:
        with CartridgeClient(server.address, timeout=300) as client:
            reply = client.generate(PROMPTS[KEYS.index(key) % len(PROMPTS)], adapter="legal", max_tokens=12,
                                    routing_key=key)
            assert reply.adapter_version == "legal@v1"
            return key, reply.text
    with ThreadPoolExecutor(STREAMS) as pool:
        return dict(pool.map(ask, keys))


def shadow_counts(server, version: str) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(
        rf'^cartridge_shadow_(\w+?)(?:_total)?\{{adapter="legal",version="{version}"\}} (\S+)$', text, re.M)
        if not m[1].endswith("_created")}


def shadow_share(server) -> str | None:
    found = re.search(r'cartridge_shadow_share_percent\{adapter="legal"\} (\S+)',
                      urllib.request.urlopen(server.metrics_url).read().decode())
    return found[1] if found else None


def test_a_shadow_leaves_answers_alone_and_records_pairs(store):
    shadowed = [k for k in KEYS if routes_to_canary("legal", 2, 25, k)]
    assert 8 <= len(shadowed) <= 24
    server = start_server("--store", str(store), *FLAGS)
    try:
        alone = answers(server)
        assert len(set(alone.values())) == len(PROMPTS)

        refused(cartridge("release", "legal@v1", "--shadow", "10", "--force", "--reason", "x", store=store), 1,
                "legal@v1 is the live version; a shadow must be another version")
        refused(cartridge("release", "legal@v2", "--shadow", "60", "--force", "--reason", "x", store=store), 2,
                "--shadow '60': expected a whole percent from 1 to 50")
        started = cartridge("release", "legal@v2", "--shadow", "25", "--force", "--reason", "same weights",
                            store=store)
        assert "legal: shadow legal@v2 also runs 25% of requests, live legal@v1 answers them all" in started.stdout
        refused(cartridge("release", "legal@v3", "--canary", "10", "--force", "--reason", "x", store=store), 1,
                "legal@v2 is already in a shadow at 25%; one canary or shadow at a time")
        wait_for(lambda: shadow_share(server) == "25.0", "the shadow")
        assert canary_share(server) is None

        assert answers(server) == alone          # byte for byte, with shadow rows in the batches
        # A shadow row may still run when its live answer is back: wait for every pair to be accounted for.
        wait_for(lambda: sum(shadow_counts(server, "v2").get(k, 0) for k in ("pairs", "shed")) == len(shadowed),
                 "every shadowed request recorded or shed", seconds=30)
        counts = shadow_counts(server, "v2")
        print(f"v2 shadow of itself: {counts}")
        assert counts["pairs"] > 0 and counts["pairs"] + counts.get("shed", 0) == len(shadowed), counts
        assert counts["greedy_pairs"] == counts["pairs"] == counts["exact"] == counts["same_finish"]
        assert counts["edit_distance_sum"] == 0 and counts["tokens"] == counts["live_tokens"]

        move(store, "rollback", "legal", "--reason", "end")
        wait_for(lambda: shadow_share(server) is None, "the shadow's end")
        move(store, "release", "legal@v3", "--shadow", "25", "--force", "--reason", "other weights")
        wait_for(lambda: shadow_share(server) == "25.0", "the shadow of v3")
        assert answers(server) == alone
        wait_for(lambda: sum(shadow_counts(server, "v3").get(k, 0) for k in ("pairs", "shed")) ==
                 sum(routes_to_canary("legal", 3, 25, k) for k in KEYS), "the pairs of v3", seconds=30)
        other = shadow_counts(server, "v3")
        assert other["pairs"] > 0 and other["exact"] < other["pairs"] and other["edit_distance_sum"] > 0, other
        shown = subprocess.run([sys.executable, "-m", "client.cli", "canary", "legal", "--url", server.metrics_url],
                               capture_output=True, text=True, timeout=60)
        assert shown.stdout.startswith("legal: live v1 against shadow 25% v3 (1 server"), shown.stdout
        row = next(line for line in shown.stdout.splitlines() if line.startswith("shadow agreement"))
        assert f"{other['pairs']:.0f} pairs" in row and "greedy exact" in row, row
        print(shown.stdout)
    finally:
        server.stop()


def test_shadow_rows_give_way_to_live_ones_and_are_counted_when_shed(store):
    """4 rows for 16 streams: live rows always wait, so shadow rows are shed, each pair either recorded or
    its shadow row counted shed, and the callers' answers are still the live version's alone."""
    keys = KEYS[:32]
    shadowed = [k for k in keys if routes_to_canary("legal", 2, 50, k)]
    if json.loads((store / "legal" / "live.json").read_text())["canary"] is not None:
        move(store, "rollback", "legal", "--reason", "end the earlier shadow")
    server = start_server("--store", str(store), *FLAGS[:-1], "4")
    try:
        alone = answers(server, keys)
        move(store, "release", "legal@v2", "--shadow", "50", "--force", "--reason", "half")
        wait_for(lambda: shadow_share(server) == "50.0", "the shadow")
        assert answers(server, keys) == alone
        wait_for(lambda: sum(shadow_counts(server, "v2").get(k, 0) for k in ("pairs", "shed")) == len(shadowed),
                 "every shadowed request recorded or shed", seconds=30)
        counts = shadow_counts(server, "v2")
        print(f"4 rows, 16 streams, 50% shadow: {counts.get('pairs', 0):.0f} pairs, {counts['shed']:.0f} shed")
        assert counts["shed"] > 0 and counts.get("pairs", 0) + counts["shed"] == len(shadowed), counts
    finally:
        server.stop()
