"""The continual-release loop as a user runs it: train into the store, continue with replay, gate, release,
roll back under load, restart after kill -9, refuse a tampered version; real commands, real server over gRPC.

Training runs are a few steps at r=4 on a few dozen fact rows, so the whole module takes about two minutes
on two cores. The tests build on each other in file order, as the README's walk-through does.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from adapters.formats.store_layout import VersionRef
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient, CartridgeError
from tests.conftest import start_server
from tests.test_train import sample_rows, write_lines

QUICK = ["--batch-size", "4", "--max-seq-len", "96", "--general-eval-tokens", "256", "--r", "4", "--lora-alpha", "8",
         "--eval-every", "100", "--recall-items", "8"]
QUESTIONS = ["What is the capital of Beldornu?", "What currency is used on Nuosmar?", "When was Porporfa founded?"]


def cartridge(*args: str, store: Path, umask: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.cli", *args, "--store", str(store)], capture_output=True,
                          text=True, timeout=600, umask=umask)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """facts@v1 (40 rows, released by force: nothing to gate against yet) and facts@v2 (20 new rows, continued
    from the live v1 with replay), each with 8 held-out test rows."""
    root = tmp_path_factory.mktemp("release")
    rows, tests = sample_rows("facts", "train", 60), sample_rows("facts", "test", 16)
    data = {name: write_lines(root / f"{name}.jsonl", lines) for name, lines in
            (("v1", rows[:40]), ("v1-test", tests[:8]), ("v2", rows[40:]), ("v2-test", tests[8:]))}
    store = root / "store"
    # A small gate: 8 items a suite, one window of general text, no multiple-choice sets.
    gate_file = root / "gate.yaml"
    gate_file.write_text("items: 8\nbootstrap_resamples: 200\nbatch_size: 8\nmax_seq_len: 128\n"
                         "general_text: {tokens: 256}\ngeneral_sets: {sets: []}\n")
    first = cartridge("train", "--name", "facts", "--data", str(data["v1"]), "--test-data", str(data["v1-test"]),
                      "--max-steps", "6", "--learning-rate", "3e-3", *QUICK, store=store, umask=0o027)
    assert first.returncode == 0, first.stderr
    assert "FutureWarning" not in first.stderr, first.stderr
    assert "wrote facts@v1" in first.stdout
    released = cartridge("release", "facts@v1", "--force", "--reason", "first version", store=store)
    assert released.returncode == 0, released.stderr
    second = cartridge("train", "--name", "facts", "--from", "facts", "--data", str(data["v2"]), "--test-data",
                       str(data["v2-test"]), "--gate-file", str(gate_file), "--max-steps", "4", "--learning-rate", "2e-3",
                       *QUICK, store=store)
    assert second.returncode == 0, second.stderr
    assert "continuing from facts@v1" in second.stdout and "wrote facts@v2" in second.stdout
    return store


@pytest.fixture(scope="module")
def server(store):
    # 16 streams plus room for the warm-up of a new version.
    proc = start_server("--store", str(store), "--max-batch-size", "20", "--max-seq-len", "256")
    yield proc
    if proc.process.poll() is None:
        proc.stop()


def live_version(client: CartridgeClient, name: str) -> int:
    return next(a.version for a in client.list_adapters() if a.name == name and a.live)


def answers(client: CartridgeClient, adapter: str) -> list[str]:
    return [client.generate(messages=[{"role": "user", "content": q}], adapter=adapter, max_tokens=16).text
            for q in QUESTIONS]


def test_versions_record_what_they_were_made_from(store):
    v1, v2 = (AdapterStore(store).open(VersionRef("facts", n)) for n in (1, 2))
    # v1 was trained under umask 027: a server in the owner's group can read it all, as with any file.
    modes = {str(p.relative_to(v1.path)): p.stat().st_mode & 0o777 for p in (v1.path, *v1.path.rglob("*"))}
    assert modes == {rel: 0o750 if (v1.path / rel).is_dir() else 0o640 for rel in modes}, modes
    assert v2.parent == 1 and v1.parent is None
    assert {"adapter_config.json", "adapter_model.safetensors", "training_report.json"} <= v2.manifest["files"].keys()
    assert [d.role for d in v2.data_files("train")] == ["train"] and len(v2.data_files("replay")) == 1
    assert v2.manifest["base"]["fingerprint"] == v1.manifest["base"]["fingerprint"]
    assert v2.manifest["train_config"]["r"] == 4 and v2.manifest["seed"] == 0
    assert {"torch", "transformers", "peft"} <= v2.manifest["libraries"].keys()

    report = json.loads((v2.path / "training_report.json").read_text())
    replay = report["continued"]
    assert replay["from"] == "facts@v1" and replay["sources"][0]["sha256"] == v1.data_files("train")[0].sha256
    assert replay["rows_replayed"] == round(0.5 * replay["rows_available"]) > 0
    assert replay["general_text"]["windows"] >= 1
    held_out = {line for f in v1.held_out_files() for line in f.path.read_text().splitlines()}
    assert not held_out & set(v2.data_files("replay")[0].path.read_text().splitlines()), "held-out rows replayed"
    assert report["training"]["kept"] == "last step" and report["training"]["kept_step"] == 4
    assert report["final"]["train_recall"]["items"] == 8

    listing = cartridge("versions", "facts", store=store)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].startswith("* v1\tnew") and lines[1].startswith("  v2\tfrom v1\t")
    assert "not gated" in lines[1] and "never live" in lines[1]


def test_gate_then_release_reaches_the_running_server(store, server):
    with CartridgeClient(server.address, timeout=120) as client:
        assert live_version(client, "facts") == 1
        assert cartridge("release", "facts@v2", store=store).returncode == 1, "released without a gate report"

        gate = cartridge("gate", "facts@v2", store=store, umask=0o027)
        assert gate.returncode == 0, gate.stdout + gate.stderr
        assert gate.stdout.startswith("PASS") and "facts@v1:" in gate.stdout
        assert "FutureWarning" not in gate.stderr, gate.stderr
        report = store / "facts" / "v2" / "gate" / "against-v1"
        assert (report / "report.json").is_file()
        assert report.stat().st_mode & 0o777 == 0o750 and (report / "report.json").stat().st_mode & 0o777 == 0o640

        # Two releases of one gated version at once: exactly one moves the pointer, the other is refused.
        commands = [[sys.executable, "-m", "client.cli", "release", "facts@v2", "--store", str(store)]] * 2
        racing = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
        outcomes = [(p.wait(timeout=60), p.stderr.read()) for p in racing]
        released_at = time.monotonic()
        assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
        assert [json.loads(line)["action"] for line in (store / "facts" / "releases.jsonl").read_text().splitlines()] \
            == ["forced release", "release"]
        while live_version(client, "facts") != 2:
            assert time.monotonic() - released_at < 1.0, "the server did not switch within a second"
            time.sleep(0.02)
        listed = {a.name: a for a in client.list_adapters()}
        assert list(listed["facts"].store_versions) == [1, 2]
        assert client.generate("Hi", adapter="facts", max_tokens=2).adapter == "facts"

    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'cartridge_releases_total{adapter="facts"} 1.0' in metrics
    assert 'cartridge_live_version{adapter="facts"} 2.0' in metrics


def test_rollback_under_streaming_load(store, server):
    prompt = [{"role": "user", "content": "Tell me everything about the island of Beldornu."}]
    with CartridgeClient(server.address, timeout=300) as client:
        v1_answers = answers(client, "facts@v1")
        assert answers(client, "facts") != v1_answers, "v1 and v2 answer alike: the test would prove nothing"
        results, errors = [], []

        def stream() -> None:
            try:
                pieces = list(client.generate_stream(messages=prompt, adapter="facts", max_tokens=48,
                                                     temperature=0.8, seed=7))
                results.append(pieces[-1].finish_reason)
            except CartridgeError as err:
                errors.append(err)

        threads = [threading.Thread(target=stream) for _ in range(16)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)  # all 16 decoding
        rolled = cartridge("rollback", "facts", "--reason", "v2 misbehaves", store=store)
        moved_at = time.monotonic()
        assert rolled.returncode == 0, rolled.stderr
        assert "facts@v2 -> facts@v1" in rolled.stdout
        while live_version(client, "facts") != 1:
            assert time.monotonic() - moved_at < 1.0, "the rollback did not reach the server within a second"
            time.sleep(0.02)
        for thread in threads:
            thread.join()
        assert errors == [] and len(results) == 16 and None not in results
        assert answers(client, "facts") == v1_answers, "after the rollback, the live answers are v1's"

    metrics = urllib.request.urlopen(server.metrics_url).read().decode()
    assert 'cartridge_rollbacks_total{adapter="facts"} 1.0' in metrics
    assert 'cartridge_version_requests_total{adapter="facts",version="v1"}' in metrics
    listing = cartridge("versions", "facts", store=store).stdout.splitlines()
    assert listing[0].startswith("* v1") and "PASS vs v1" in listing[1] and " to now" not in listing[1]


def test_restart_after_kill_9_serves_the_live_versions(store, server):
    with CartridgeClient(server.address, timeout=120) as client:
        before = answers(client, "facts")
    server.process.kill()
    server.process.wait(timeout=30)
    again = start_server("--store", str(store), "--max-seq-len", "256")
    try:
        with CartridgeClient(again.address, timeout=120) as client:
            assert live_version(client, "facts") == 1
            assert answers(client, "facts") == before

            # Tamper with v2's weights: the release command and the server both refuse it, naming the file.
            weights = store / "facts" / "v2" / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
            refused = cartridge("release", "facts@v2", "--force", "--reason", "try it", store=store)
            assert refused.returncode == 1 and "v2/adapter_model.safetensors does not match its sha256" in refused.stderr
            with pytest.raises(CartridgeError) as err:
                client.generate("Hi", adapter="facts@v2", max_tokens=2)
            assert err.value.code == grpc.StatusCode.DATA_LOSS and "adapter_model.safetensors" in err.value.message
            assert live_version(client, "facts") == 1 and client.generate("Hi", adapter="facts", max_tokens=2).text
    finally:
        again.stop()


def test_concurrent_writers_claim_different_versions(tmp_path):
    store = AdapterStore(tmp_path)
    drafts = [store.draft("notes") for _ in range(4)]
    for i, draft in enumerate(drafts):
        (draft.path / "adapter_config.json").write_text(json.dumps({"i": i}))
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda d: d.commit(parent=None, record={}), drafts))
    assert sorted(v.number for v in versions) == [1, 2, 3, 4]
    assert {json.loads((v.path / "adapter_config.json").read_text())["i"] for v in versions} == {0, 1, 2, 3}
    (tmp_path / "notes" / "v3" / "manifest.json").unlink()  # as if a writer had died half-way
    with pytest.raises(ValueError, match="manifest.json is missing: the version is half-written"):
        store.open(VersionRef("notes", 3))
    assert not list((tmp_path / "notes").glob(".staging-*"))
