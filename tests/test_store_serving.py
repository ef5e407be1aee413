"""`cartridge serve --store`: a release is copied into a device slot before the name switches to it, a failed
copy leaves the old version serving, and the per-version metrics keep only live and pinned versions.

The versions are small random peft adapters written through the store's own API (no training), released
with the real `cartridge release` command.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from adapters.formats.store_layout import StoredVersion
from adapters.store.versions import AdapterStore
from cartridge.v1 import adapters_pb2
from client.client import CartridgeClient

from .conftest import PROMPT, make_peft_adapter, start_server

FLAGS = ["--max-adapters", "3", "--max-lora-rank", "8", "--max-seq-len", "256", "--max-batch-size", "4"]


def store_random_version(store: AdapterStore, name: str, base_model, seed: int) -> StoredVersion:
    """The next version of `name`: a random rank-8 adapter, far enough from the base to change greedy text."""
    draft = store.draft(name)
    make_peft_adapter(base_model, draft.path, 8, ["q_proj", "v_proj", "o_proj"], seed=seed, b_std=0.1)
    return draft.commit(parent=None, record={"made_by": "tests: random weights"})


def release(store: Path, ref: str) -> None:
    done = subprocess.run([sys.executable, "-m", "client.cli", "release", ref, "--force", "--reason", "test",
                           "--store", str(store)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def store(base_model, tmp_path_factory) -> Path:
    """legal@v1..v3, v1 live."""
    root = tmp_path_factory.mktemp("store")
    for seed in (1, 2, 3):
        store_random_version(AdapterStore(root), "legal", base_model, seed)
    release(root, "legal@v1")
    return root


def live_entry(client: CartridgeClient, name: str) -> adapters_pb2.AdapterInfo:
    return next(a for a in client.list_adapters() if a.name == name and a.live)


def text(client: CartridgeClient, adapter: str) -> str:
    return client.generate(PROMPT, adapter=adapter, max_tokens=8).text


def test_a_release_switches_once_warm_and_metrics_keep_only_live_and_pinned_versions(store):
    server = start_server("--store", str(store), *FLAGS)
    try:
        with CartridgeClient(server.address, timeout=120) as client:
            answers = {"v1": text(client, "legal")}
            assert text(client, "legal@v1") == answers["v1"]       # pinned by number: a canary's view
            for number in (2, 3):
                release(store, f"legal@v{number}")
                moved = time.monotonic()
                while (entry := live_entry(client, "legal")).version != number:
                    assert time.monotonic() - moved < 2.0, "the release did not reach the server"
                    time.sleep(0.005)
                # The first moment the new version is visible, it already sits in a device slot.
                assert entry.location == adapters_pb2.ADAPTER_LOCATION_DEVICE and entry.device_slot > 0
                answers[f"v{number}"] = text(client, "legal")
            assert len(set(answers.values())) == 3, f"versions answer alike, the test would prove nothing: {answers}"
            assert text(client, "legal@v1") == answers["v1"]

        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        served = re.findall(r'cartridge_version_requests_total\{adapter="legal",version="(v\d+)"\} (\S+)', metrics)
        # v2 served a request while it was live; once replaced (and never asked for by number) its series goes.
        assert dict(served) == {"v1": "3.0", "v3": "1.0"}
        assert 'cartridge_live_version{adapter="legal"} 3.0' in metrics
        assert 'cartridge_releases_total{adapter="legal"} 2.0' in metrics
        switches = [line for line in server.log if re.search(r"now serving legal@v[23] ", line)]
        assert len(switches) == 2 and all("in a device slot before the switch" in line for line in switches)
        # v1 was released before the server started: restored, not a switch that took since the release.
        restored = [line for line in server.log if "now serving legal@v1 " in line]
        assert len(restored) == 1 and "now serving legal@v1 (restored at start-up); " in restored[0], restored
    finally:
        server.stop()


def test_a_failed_device_copy_leaves_the_old_version_serving(store, monkeypatch):
    """In-process server, because the failure is injected: the copy into a device slot raises as a CUDA
    out-of-memory would, which this CPU machine cannot produce for real."""
    from server.lora.slots import AdapterSlots
    from server.app import build_server
    from server.config import ServerConfig

    running = build_server(ServerConfig(store=str(store), port=0, metrics_port=0, max_adapters=3, max_lora_rank=8,
                                        max_seq_len=256, max_batch_size=4))
    try:
        with CartridgeClient(f"127.0.0.1:{running.port}", timeout=120) as client:
            before_version = live_entry(client, "legal").version
            before = text(client, "legal")
            load = AdapterSlots._load

            def failing_copy(slots, slot, adapter):
                if adapter.live and adapter.version != before_version:
                    raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
                load(slots, slot, adapter)
            monkeypatch.setattr(AdapterSlots, "_load", failing_copy)
            target = 2 if before_version != 2 else 1
            release(store, f"legal@v{target}")
            failures = 'cartridge_store_load_failures_total{adapter="legal"} 1.0'
            moved = time.monotonic()
            while failures not in urllib.request.urlopen(f"http://127.0.0.1:{running.metrics_port}/metrics").read().decode():
                assert time.monotonic() - moved < 3.0, "the failed copy was not counted"
                time.sleep(0.02)
            assert live_entry(client, "legal").version == before_version
            assert text(client, "legal") == before

            monkeypatch.undo()                 # the device recovers: the next release goes through, warmed
            release(store, f"legal@v{before_version}")   # back to it, as a new move of the pointer
            release(store, f"legal@v{target}")
            moved = time.monotonic()
            while (entry := live_entry(client, "legal")).version != target:
                assert time.monotonic() - moved < 3.0, "the next release did not reach the server"
                time.sleep(0.005)
            assert entry.location == adapters_pb2.ADAPTER_LOCATION_DEVICE
    finally:
        running.drain(0)
