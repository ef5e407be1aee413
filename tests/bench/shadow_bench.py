"""Shadow cost: generated tokens per second of one server under 32 client streams, with no shadow and with a
5 % shadow of another version, alternated on the same server (none, shadow, none, shadow) so drift shows.

    python -m tests.bench.shadow_bench                 # embedded SmolLM2-135M, dense fp32, on this CPU

The shadow's rows are extra rows in the same batches; callers see only the live tokens, which are what is
counted. Prints one JSON object: each phase's tokens/s, and the shadow's pairs and shed rows. A benchmark,
not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from transformers import AutoConfig

from adapters.formats.base_checkpoint import resolve_base
from adapters.formats.store_layout import VersionRef
from adapters.release.lifecycle import release, rollback
from adapters.store.versions import AdapterStore
from client.client import CartridgeClient
from tests.bench.serve_bench import write_random_adapter
from tests.conftest import start_server

MESSAGES = [{"role": "user", "content": "Tell me a long story about a gardener and her orchard."}]


def phase(server, streams: int, requests: int, max_tokens: int) -> dict:
    """Live tokens, seconds and tokens per second of `streams` streams sending `requests` greedy requests
    each, with random routing keys."""
    def stream(_: int) -> int:
        with CartridgeClient(server.address, timeout=600) as client:
            return sum(client.generate(messages=MESSAGES, adapter="legal", max_tokens=max_tokens,
                                       routing_key=uuid.uuid4().hex).completion_tokens for _ in range(requests))
    started = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        tokens = sum(pool.map(stream, range(streams)))
    seconds = time.monotonic() - started
    return {"tokens": tokens, "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="per stream and phase")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--shadow", type=int, default=5, help="percent")
    parser.add_argument("--out", default="shadow_bench.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shadow-bench-"))
    store, config = AdapterStore(root), AutoConfig.from_pretrained(resolve_base(None))
    for seed in (1, 2):
        draft = store.draft("legal")
        write_random_adapter(draft.path, config, 8, seed)
        draft.commit(parent=None, record={"made_by": "shadow_bench: random weights"})
    release(store, VersionRef("legal", 1), force=True, reason="bench")
    # Room for every live stream and the shadow's rows beside them: a full batch would shed every shadow row.
    server = start_server("--store", str(root), "--max-batch-size", str(args.streams + 8), "--max-seq-len", "256",
                          "--max-adapters", "3", "--max-lora-rank", "8")
    try:
        phase(server, args.streams, 1, 4)    # warm-up
        figures = {"none": [], "shadow": []}
        for mode in ("none", "shadow", "none", "shadow"):
            if mode == "shadow":
                release(store, VersionRef("legal", 2), force=True, reason="bench", shadow=args.shadow)
            time.sleep(0.5)                  # the server follows within 0.2 s
            figures[mode].append(phase(server, args.streams, args.requests, args.max_tokens))
            if mode == "shadow":
                rollback(store, "legal", None, "bench")
        metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        counts = {m[1]: float(m[2]) for m in re.finditer(
            r'^cartridge_shadow_(pairs|shed)_total\{adapter="legal",version="v2"\} (\S+)$', metrics, re.M)}
    finally:
        server.stop()
    mean = {mode: sum(p["tokens"] for p in v) / sum(p["seconds"] for p in v) for mode, v in figures.items()}
    result = {"streams": args.streams, "requests_per_stream": args.requests, "max_tokens": args.max_tokens,
              "shadow_percent": args.shadow, "phases": figures,
              "shadow_over_none": round(mean["shadow"] / mean["none"], 3), "shadow_pairs": counts.get("pairs", 0),
              "shadow_shed": counts.get("shed", 0)}
    print(json.dumps(result))
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
