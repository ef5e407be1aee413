"""Automatic abort: a canary released with `--abort-...` limits is ended by the server that sees a limit crossed,
within its check interval (`serve --canary-check-s`) plus a second, under the release's compare-and-set, and
releases.jsonl records `canary aborted` with the numbers. A server started after kill -9 resumes the limits.

Errors are real ones: the server runs with `--max-host-adapter-bytes 0`, so every request reads its version's
weights again and checks them against the sha256 taken when the version loaded; the canary's weights file is
then damaged on disk, and each request the split sends to the canary fails with FAILED_PRECONDITION, as it would
after a disk fault or an overwrite. Feedback is planted through the real Feedback call on real answers.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest

from adapters.formats.store_layout import release_log, routes_to_canary
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient, CartridgeError
from tests.conftest import PROMPT, start_server
from tests.release_helpers import FLAGS, canary_share, move, wait_for
from tests.test_release import cartridge
from tests.test_store_serving import store_random_version

CHECK_S = 1.0
KEYS = [f"key-{i}" for i in range(400)]
ON_CANARY = [k for k in KEYS if routes_to_canary("legal", 2, 50, k)]
ON_LIVE = [k for k in KEYS if not routes_to_canary("legal", 2, 50, k)]


@pytest.fixture
def store(base_model, tmp_path) -> Path:
    for seed in (1, 2):
        store_random_version(AdapterStore(tmp_path), "legal", base_model, seed)
    move(tmp_path, "release", "legal@v1", "--force", "--reason", "first")
    return tmp_path


def canary_entry(store: Path) -> dict | None:
    return json.loads((store / "legal" / "live.json").read_text())["canary"]


def test_errors_on_the_canary_abort_it_within_the_check_interval_plus_a_second(store):
    flags = ["--store", str(store), *FLAGS, "--max-host-adapter-bytes", "0", "--canary-check-s", str(CHECK_S)]
    server = start_server(*flags)
    try:
        started = cartridge("release", "legal@v2", "--canary", "50", "--abort-error-rate", "0.05", "--force",
                            "--reason", "try", store=store)
        assert started.returncode == 0 and "aborted by servers past error_rate=0.05" in started.stdout, started
        assert canary_entry(store)["limits"] == {"error_rate": 0.05, "tpot_pct": None, "feedback_min_n": None}
        wait_for(lambda: canary_share(server) == "50.0", "the canary")
        # kill -9, and a new server: it resumes the split, and its limits, from the store.
        server.process.kill()
        server.process.wait()
        server = start_server(*flags)
        assert canary_share(server) == "50.0"
        with CartridgeClient(server.address, timeout=120) as client:
            for key in ON_CANARY[:3] + ON_LIVE[:3]:     # healthy first: no abort
                assert client.generate(PROMPT, adapter="legal", max_tokens=2, routing_key=key).text
            time.sleep(CHECK_S * 1.5)
            assert canary_entry(store) is not None

            weights = store / "legal" / "v2" / "adapter_model.safetensors"
            data = weights.read_bytes()
            weights.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
            first_error = None
            for key in ON_CANARY[3:]:      # until the abort puts the canary's keys back on the live version
                try:
                    answer = client.generate(PROMPT, adapter="legal", max_tokens=2, routing_key=key)
                except CartridgeError as err:
                    assert err.code.name == "FAILED_PRECONDITION" and "changed on disk" in err.message, err
                    first_error = first_error or time.time()
                    time.sleep(0.05)
                    continue
                assert first_error is not None and answer.adapter_version == "legal@v1"
                break
            served = time.time() - first_error      # an answer from the old split (or sooner)
            assert canary_entry(store) is None and canary_share(server) is None
            assert {client.generate(PROMPT, adapter="legal", max_tokens=2, routing_key=k).adapter_version
                    for k in ON_CANARY[:5]} == {"legal@v1"}
        last = release_log(AdapterStore(store), "legal")[-1]
        assert (last.action, last.from_version, last.to_version, last.canary) == ("canary aborted", 1, 1, None)
        moved = datetime.fromisoformat(last.time).timestamp() - first_error
        assert moved <= CHECK_S + 1 and served <= CHECK_S + 1, (moved, served)
        assert last.tripped.startswith("error rate ") and "above live 0.000 (0/" in last.tripped, last.tripped
        assert server.logged("canary v2 aborted: error rate")
        print(f"first error -> pointer moved back {moved:.2f} s, -> old split served {served:.2f} s "
              f"(check interval {CHECK_S} s)")
        listing = cartridge("versions", "legal", store=store).stdout
        assert "canary 50%" in listing and "aborted: error rate" in listing, listing
    finally:
        server.stop()


def test_a_feedback_drop_aborts_once_significant_and_not_before_n_ratings(store):
    min_n = 30
    server = start_server("--store", str(store), *FLAGS, "--canary-check-s", "0.5")
    try:
        move(store, "release", "legal@v2", "--canary", "50", "--abort-feedback-min-n", str(min_n), "--force",
             "--reason", "try")
        wait_for(lambda: canary_share(server) == "50.0", "the canary")
        with CartridgeClient(server.address, timeout=120) as client:
            def rate(keys: list[str], scores: tuple[float, float]) -> None:
                for i, key in enumerate(keys):
                    answer = client.generate(PROMPT, adapter="legal", max_tokens=1, routing_key=key)
                    client.feedback(answer.request_id, scores[i % 2])

            # A planted drop (live 1.0/0.5, canary -0.5/0.0), significant by far, but 29 ratings a side.
            rate(ON_LIVE[:min_n - 1], (1.0, 0.5))
            rate(ON_CANARY[:min_n - 1], (-0.5, 0.0))
            time.sleep(2.5)     # five checks
            assert canary_entry(store) is not None, "aborted before N ratings"
            rate(ON_LIVE[min_n - 1:min_n], (1.0, 0.5))
            rate(ON_CANARY[min_n - 1:min_n], (-0.5, 0.0))
            wait_for(lambda: canary_entry(store) is None, "the feedback abort", seconds=5)  # a 2-core CPU under load
        tripped = release_log(AdapterStore(store), "legal")[-1].tripped
        assert f"over {min_n} ratings, lower than live" in tripped and "p = 0.0000 < 0.05" in tripped, tripped
    finally:
        server.stop()


def test_abort_limits_are_checked_before_anything_moves(store):
    before = (store / "legal" / "live.json").read_bytes()
    for flags, words in [(["--abort-error-rate", "1.5"], "--abort-error-rate 1.5: a fraction from 0 to 1"),
                         (["--abort-tpot-pct", "0"], "--abort-tpot-pct 0.0: a percent above 0"),
                         (["--abort-feedback-min-n", "10"], "--abort-feedback-min-n 10: at least 30 ratings")]:
        refused = cartridge("release", "legal@v2", "--canary", "10", *flags, "--force", "--reason", "x", store=store)
        assert refused.returncode == 2 and words in refused.stderr, refused.stderr
    refused = cartridge("release", "legal@v2", "--abort-error-rate", "0.1", "--force", "--reason", "x", store=store)
    assert refused.returncode == 1 and "limits apply to a canary: give --canary PCT too" in refused.stderr
    assert (store / "legal" / "live.json").read_bytes() == before


def test_a_canary_takes_its_limits_from_the_gate_file_unless_flags_give_them(tmp_path):
    gate_file = tmp_path / "gate.yaml"
    gate_file.write_text("canary:\n  error_rate: 0.02\n  feedback_min_n: 50\n")
    store = AdapterStore(tmp_path / "store")
    for i in range(3):
        draft = store.draft("legal")
        (draft.path / "adapter_config.json").write_text(json.dumps({"i": i}))
        draft.commit(parent=None, record={"train_config": {"gate_file": str(gate_file)}})
    root = store.root
    move(root, "release", "legal@v1", "--force", "--reason", "first")
    move(root, "release", "legal@v2", "--canary", "10", "--force", "--reason", "from the gate file")
    assert canary_entry(root)["limits"] == {"error_rate": 0.02, "tpot_pct": None, "feedback_min_n": 50}
    move(root, "release", "legal@v2", "--canary", "20", "--force", "--reason", "a change keeps them")
    assert canary_entry(root)["limits"]["feedback_min_n"] == 50
    move(root, "rollback", "legal")
    move(root, "release", "legal@v2", "--canary", "10", "--abort-tpot-pct", "30", "--force", "--reason", "flags")
    assert canary_entry(root)["limits"] == {"error_rate": None, "tpot_pct": 30, "feedback_min_n": None}
    move(root, "rollback", "legal")
    gate_file.write_text("canary:\n  error_rate: 2\n")
    refused = cartridge("release", "legal@v3", "--canary", "10", "--force", "--reason", "x", store=root)
    assert refused.returncode == 1 and "legal@v3: its gate file's canary limits cannot be used: canary.error_rate: " \
        "a fraction from 0 to 1" in refused.stderr, refused.stderr
    assert canary_entry(root) is None
