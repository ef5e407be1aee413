"""Feedback and the per-version metrics a release decision reads: a rating given with the id an answer carried
(gRPC GenerateResponse.request_id, the OpenAI response's `id`) is counted for the stored version that gave the
answer, live or canary; requests, errors, TTFT and TPOT are labelled by that version, pinned versions collapse.

A real server on a store of random peft versions, the real `cartridge release` command.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from adapters.formats.store_layout import routes_to_canary
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient, CartridgeError
from tests.conftest import PROMPT, start_server
from tests.release_helpers import FLAGS, KEYS, canary_share, http_post, move, wait_for
from tests.test_store_serving import store_random_version


@pytest.fixture(scope="module")
def store(base_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feedback")
    for seed in (1, 2):
        store_random_version(AdapterStore(root), "legal", base_model, seed)
    move(root, "release", "legal@v1", "--force", "--reason", "first")
    move(root, "release", "legal@v2", "--canary", "50", "--force", "--reason", "try")
    return root


def metric(text: str, name: str, version: str) -> float:
    found = re.search(rf'^{name}\{{adapter="legal",version="{version}"\}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def test_feedback_is_counted_for_the_version_that_answered(store):
    server = start_server("--store", str(store), *FLAGS)
    try:
        wait_for(lambda: canary_share(server) == "50.0", "the canary")
        on = {k: "legal@v2" if routes_to_canary("legal", 2, 50, k) else "legal@v1" for k in KEYS}
        with CartridgeClient(server.address, timeout=120) as client:
            ratings = {"legal@v1": [], "legal@v2": []}
            for i, key in enumerate(KEYS[:8]):
                answer = client.generate(PROMPT, adapter="legal", max_tokens=4, routing_key=key)
                assert answer.adapter_version == on[key] and answer.request_id.startswith("req-")
                score = 1.0 if answer.adapter_version == "legal@v1" else -0.5
                assert client.feedback(answer.request_id, score, tag="helpful" if i % 2 else "") == on[key]
                ratings[on[key]].append(score)
            streamed = list(client.generate_stream(PROMPT, adapter="legal", max_tokens=4, routing_key=KEYS[0]))
            assert streamed[-1].request_id and client.feedback(streamed[-1].request_id, 0) == on[KEYS[0]]
            ratings[on[KEYS[0]]].append(0.0)

            # The OpenAI edge: the response's id is what /v1/feedback takes.
            status, headers, body = http_post(server, {"model": "legal", "prompt": PROMPT, "max_tokens": 4,
                                                       "user": KEYS[1]})
            assert status == 200 and body["id"].startswith("cmpl-"), body
            status, _, rated = http_post(server, {"id": body["id"], "score": 1, "tag": "helpful"}, "/feedback")
            assert status == 200 and rated == {"id": body["id"], "adapter_version": on[KEYS[1]]}
            assert headers["x-cartridge-adapter-version"] == on[KEYS[1]]
            ratings[on[KEYS[1]]].append(1.0)

            # A pinned version answers under its own name@vN, and is counted as "other".
            pinned = client.generate(PROMPT, adapter="legal@v1", max_tokens=4)
            assert client.feedback(pinned.request_id, -1) == "legal@v1"
            assert client.feedback(pinned.request_id, 1) == "legal@v1"     # replaces the -1: one answer, one rating
            base = client.generate(PROMPT, max_tokens=2)

            # Refusals: by field, with the server still serving.
            for request_id, score, tag, code, words in [
                    ("req-nope", 1, "", "NOT_FOUND", "is not among the answers this server gave"),
                    (base.request_id, 1, "", "NOT_FOUND", "is not among the answers"),
                    (pinned.request_id, 1.5, "", "INVALID_ARGUMENT", "score must be a number from -1 to 1"),
                    (pinned.request_id, float("nan"), "", "INVALID_ARGUMENT", "score must be a number"),
                    (pinned.request_id, 1, "no spaces", "INVALID_ARGUMENT", "tag must be 1 to 32 letters"),
                    (pinned.request_id, 1, "t" * 33, "INVALID_ARGUMENT", "tag must be 1 to 32"),
                    ("", 1, "", "INVALID_ARGUMENT", "request_id must be 1 to 128")]:
                with pytest.raises(CartridgeError) as err:
                    client.feedback(request_id, score, tag)
                assert err.value.code.name == code and words in err.value.message, err.value
            for body, code, words in [({"id": "cmpl-nope", "score": 1}, 404, "is not among the answers"),
                                      ({"id": body["id"], "score": 2}, 400, "score must be a number from -1 to 1"),
                                      ({"id": body["id"], "score": "1"}, 400, "score must be a number"),
                                      ({"id": body["id"]}, 400, "score must be a number"),
                                      ({"score": 1}, 400, "id is required"),
                                      ({"id": body["id"], "score": 1, "stars": 5}, 400, "stars is not supported"),
                                      ([1], 400, "must be a JSON object")]:
                status, _, refused = http_post(server, body, "/feedback")
                assert status == code and words in refused["error"]["message"], refused
            assert client.generate(PROMPT, adapter="legal", max_tokens=2).text

        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        for version, scores in ratings.items():
            label = version.split("@")[1]
            assert metric(metrics, "cartridge_feedback_ratings_total", label) == len(scores), version
            assert metric(metrics, "cartridge_feedback_score_sum", label) == pytest.approx(sum(scores))
            assert metric(metrics, "cartridge_feedback_score_squares_sum", label) == \
                pytest.approx(sum(s * s for s in scores))
        assert metric(metrics, "cartridge_feedback_ratings_total", "other") == 1
        assert metric(metrics, "cartridge_feedback_score_sum", "other") == 1
        assert metric(metrics, "cartridge_feedback_score_squares_sum", "other") == 1
        assert re.search(r'cartridge_feedback_tags_total\{adapter="legal",tag="helpful",version="v\d"\} [1-9]', metrics)
        # Per-version requests and latencies: every answered request, the pinned one under "other".
        total = sum(metric(metrics, "cartridge_release_requests_total", f"v{n}") for n in (1, 2))
        assert total == 8 + 1 + 1 + 1 and metric(metrics, "cartridge_release_requests_total", "other") == 1
        assert metric(metrics, "cartridge_release_errors_total", "v2") == 0
        assert sum(metric(metrics, "cartridge_release_ttft_seconds_count", f"v{n}") for n in (1, 2)) == total
        assert metric(metrics, "cartridge_release_tpot_seconds_count", "v2") > 0

        # `cartridge canary` shows the same counts; given the same server twice it sums them, as for two replicas.
        shown = subprocess.run([sys.executable, "-m", "client.cli", "canary", "legal", "--url", server.metrics_url],
                               capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "legal: live v1 against canary 50% v2 (1 server, 95% intervals)", lines
        for version, column in (("legal@v1", 1), ("legal@v2", 2)):
            scores = ratings[version]
            feedback = re.split(r"\s{2,}", next(l for l in lines if l.startswith("feedback")))[column]
            mean = sum(scores) / len(scores)
            assert feedback.startswith(f"{mean:+.3f} [") and f"n={len(scores)}" in feedback, (version, feedback)
        assert re.search(r"^error rate\s+0\.0% \[0\.0%, \d+\.\d%\]\s+0\.0% \[", shown.stdout, re.M), shown.stdout
        assert re.search(r"^TPOT p95\s+\d+ ms \[\d+, \d+\] n=\d+", shown.stdout, re.M), shown.stdout
        twice = subprocess.run([sys.executable, "-m", "client.cli", "canary", "legal", "--url", server.metrics_url,
                                "--url", server.metrics_url], capture_output=True, text=True, timeout=60)
        requests = lambda out: [int(n) for n in re.findall(r"(\d+) \(", next(l for l in out.splitlines()
                                                                          if l.startswith("requests")))]
        assert "(2 servers," in twice.stdout and requests(twice.stdout) == [2 * n for n in requests(shown.stdout)]

        # From the command line: `generate --json` gives the id, `feedback` rates it.
        cli = [sys.executable, "-m", "client.cli"]
        answer = json.loads(subprocess.run([*cli, "generate", "Hi", "--adapter", "legal", "--max-tokens", "2", "--json",
                                            "--server", server.address], capture_output=True, text=True).stdout)
        rated = subprocess.run([*cli, "feedback", answer["request_id"], "0.5", "--tag", "cli", "--server",
                                server.address], capture_output=True, text=True)
        assert rated.returncode == 0 and rated.stdout.strip() == answer["adapter_version"], rated
        wrong = subprocess.run([*cli, "feedback", answer["request_id"], "3", "--server", server.address],
                               capture_output=True, text=True)
        assert wrong.returncode == 1 and "INVALID_ARGUMENT: score must be a number from -1 to 1" in wrong.stderr
    finally:
        server.stop()
