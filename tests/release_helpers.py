"""Helpers of the tests that release canaries and shadows through the real commands and watch a real server
follow them (test_canary, test_canary_abort, test_feedback, test_shadow)."""
from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.test_release import cartridge

KEYS = [f"user-{i}" for i in range(20)]
FLAGS = ["--http-port", "0", "--max-adapters", "3", "--max-lora-rank", "8", "--max-seq-len", "256",
         "--max-batch-size", "20"]


def refused(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def move(store: Path, *args: str) -> None:
    done = cartridge(*args, store=store)
    assert done.returncode == 0, done.stderr


def canary_share(server) -> str | None:
    found = re.search(r'cartridge_canary_share_percent\{adapter="legal"\} (\S+)',
                      urllib.request.urlopen(server.metrics_url).read().decode())
    return found[1] if found else None


def wait_for(condition, what: str, seconds: float = 3.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"the server did not follow: {what}"
        time.sleep(0.02)


def http_post(server, body: object, path: str = "/completions") -> tuple[int, dict, dict]:
    """POSTs `body` as JSON to the OpenAI edge's `path`: status, headers and the JSON answer."""
    request = urllib.request.Request(server.http_url + path, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())
