"""Server memory across many register/unregister cycles while streams run.

    python -m tests.bench.adapter_cycles                     # 1,000 cycles beside 16 streams
    python -m tests.bench.adapter_cycles --cycles 200 --streams 4

Every cycle registers a new name (a fresh random rank-8 adapter file, one of --files kept on
disk), and every --probe-every cycles runs one request through it, so it is copied into a device
slot and gets metric series; then it is unregistered. Meanwhile --streams streams run on the base
and on resident adapters, one after the other. The server's RSS is sampled every 100 cycles.
Prints one JSON object. A measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import re
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil
from transformers import AutoConfig

from adapters.formats.base_checkpoint import resolve_base
from client.client import CartridgeClient
from tests.bench.serve_bench import write_random_adapter
from tests.conftest import start_server

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"   # the base keeps counting: streams that run their length


def keep_streaming(address: str, adapter: str, stop: threading.Event, counts: list[int]) -> None:
    with CartridgeClient(address, timeout=300) as client:
        while not stop.is_set():
            pieces = list(client.generate_stream(PROMPT, adapter=adapter, max_tokens=64))
            counts.append(pieces[-1].completion_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--files", type=int, default=8, help="distinct adapter files cycled through")
    parser.add_argument("--probe-every", type=int, default=10)
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(resolve_base(None))
    with tempfile.TemporaryDirectory() as tmp:
        files = [write_random_adapter(Path(tmp) / f"a{i}", config, rank=8, seed=i) for i in range(args.files)]
        server = start_server("--max-batch-size", str(args.streams + 1), "--max-adapters", "4",
                              "--max-lora-rank", "8", "--max-seq-len", "512",
                              "--adapter", f"steady={files[0]}")
        process = psutil.Process(server.process.pid)
        stop, counts = threading.Event(), []
        streams = [threading.Thread(target=keep_streaming, args=(server.address, "steady" if i % 2 else "", stop,
                                                                 counts), daemon=True) for i in range(args.streams)]
        try:
            for thread in streams:
                thread.start()
            samples, started = [], time.monotonic()
            with CartridgeClient(server.address, timeout=300) as client:
                for cycle in range(args.cycles + 1):
                    if cycle % 100 == 0:
                        samples.append({"cycle": cycle, "rss_mib": round(process.memory_info().rss / 2**20, 1)})
                    if cycle == args.cycles:
                        break
                    name = f"cycle-{cycle}"
                    client.register_adapter(name, str(files[cycle % len(files)]))
                    if cycle % args.probe_every == 0:
                        client.generate(PROMPT, adapter=name, max_tokens=1)
                    client.unregister_adapter(name)
                registered = [a.name for a in client.list_adapters()]
            seconds = time.monotonic() - started
            metrics = urllib.request.urlopen(server.metrics_url).read().decode()
        finally:
            stop.set()
            for thread in streams:
                thread.join(300)
            server.stop()
    first, last = samples[0]["rss_mib"], samples[-1]["rss_mib"]
    print(json.dumps({
        "cycles": args.cycles, "streams": args.streams, "seconds": round(seconds, 1),
        "streams_finished": len(counts), "tokens_streamed": sum(counts),
        "rss_mib": samples, "rss_growth_mib": round(last - first, 1),
        "rss_growth_after_first_100_mib": round(last - samples[min(1, len(samples) - 1)]["rss_mib"], 1),
        "registered_after": registered,
        "metric_series_of_cycled_names": len(re.findall(r'adapter="cycle-', metrics)),
    }, indent=1))


if __name__ == "__main__":
    main()
