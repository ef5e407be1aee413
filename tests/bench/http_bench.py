"""The same server through its two front doors: gRPC (our client) against OpenAI HTTP (the `openai` package).

    python -m tests.bench.http_bench [--rounds 3] [--max-tokens 64] [--out FILE]

One server on the embedded SmolLM2-135M (dense float32 on the CPU), 32 KV slots. Each round runs, for
each protocol in turn, 1 stream (4 requests one after another) and 32 streams at once; every request
streams a counting prompt the base model keeps counting on, greedy, to max_tokens. Figures per case:
generated tokens/s over the wall time (first request sent to last token read), mean time to first
token, and mean gap between tokens within a stream. The clients run in this process, on the same
cores as the server, as they would on a one-box deployment. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import openai

from client.client import CartridgeClient
from tests.conftest import start_server

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"


def grpc_stream(client: CartridgeClient, max_tokens: int) -> tuple[float, list[float], int]:
    start, stamps, tokens = time.perf_counter(), [], 0
    for piece in client.generate_stream(PROMPT, max_tokens=max_tokens):
        stamps.append(time.perf_counter())
        tokens = piece.completion_tokens or tokens
    return start, stamps, tokens


def http_stream(api: openai.OpenAI, max_tokens: int) -> tuple[float, list[float], int]:
    start, stamps, tokens = time.perf_counter(), [], 0
    for chunk in api.completions.create(model="base", prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text:
            stamps.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return start, stamps, tokens


def run_case(call, streams: int, requests: int) -> dict:
    began = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: call(), range(requests)))
    wall = time.perf_counter() - began
    ttft = [stamps[0] - start for start, stamps, _ in results]
    gaps = [(stamps[-1] - stamps[0]) / (len(stamps) - 1) for _, stamps, _ in results if len(stamps) > 1]
    tokens = sum(t for *_, t in results)
    return {"tokens_per_s": tokens / wall, "ttft_ms": 1000 * statistics.mean(ttft),
            "ms_between_tokens": 1000 * statistics.mean(gaps), "tokens": tokens, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out")
    args = parser.parse_args()

    server = start_server("--http-port", "0", "--max-batch-size", "32", "--max-seq-len", "256")
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {}
    try:
        with CartridgeClient(server.address, timeout=300) as client, \
                openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=300) as api:
            doors = {"grpc": lambda: grpc_stream(client, args.max_tokens),
                     "http": lambda: http_stream(api, args.max_tokens)}
            for door in doors.values():   # warm-up: first-call costs (allocator, connections) out of the figures
                run_case(door, 4, 4)
            for _ in range(args.rounds):
                for streams, requests in ((1, 4), (32, 32)):
                    for name, door in doors.items():
                        runs.setdefault(f"{name} {streams} stream{'s' * (streams > 1)}", []).append(
                            run_case(door, streams, requests))
    finally:
        server.stop()
    summary = {case: {key: {"median": statistics.median(r[key] for r in rounds),
                            "min": min(r[key] for r in rounds), "max": max(r[key] for r in rounds)}
                      for key in ("tokens_per_s", "ttft_ms", "ms_between_tokens")}
               for case, rounds in runs.items()}
    report = {"rounds": args.rounds, "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "cases": summary,
              "runs": runs}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
