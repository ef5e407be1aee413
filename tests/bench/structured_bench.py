"""Structured output's cost: throughput of 8 concurrent streams with 0 % and 25 % JSON-schema rows, and the
grammar compile time of a 20-field schema, cold and cached.

    .venv/bin/python -m tests.bench.structured_bench [--rounds 3] [--max-tokens 48]

Starts a real server (CPU by default) on loopback, speaks OpenAI HTTP to it, prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

STREAMS = 8
SCHEMA_20 = {"type": "object", "additionalProperties": False,
             "properties": {f"field_{i}": ({"type": "integer"} if i % 3 == 0 else {"type": "boolean"} if i % 3 == 1
                                           else {"type": "string", "maxLength": 16}) for i in range(20)},
             "required": [f"field_{i}" for i in range(20)]}
SMALL = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"},
                                          "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}}},
         "required": ["name", "age", "tags"], "additionalProperties": False}


def throughput(url: str, constrained: int, max_tokens: int, rounds: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> int:
        fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": SMALL}}} \
            if i < constrained else {}
        stream = client.chat.completions.create(
            model="base", messages=[{"role": "user", "content": f"Describe person number {i} as JSON."}],
            max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True}, **fields)
        return [c for c in stream][-1].usage.completion_tokens

    rates = []
    for _ in range(rounds):
        started = time.monotonic()
        with ThreadPoolExecutor(STREAMS) as pool:
            tokens = sum(pool.map(one, range(STREAMS)))
        rates.append(tokens / (time.monotonic() - started))
    return {"figure": "throughput", "streams": STREAMS, "json_schema_rows": constrained,
            "tokens_per_s": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates]}


def compile_times(repeats: int = 5) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    from adapters.formats.base_checkpoint import resolve_base
    from server.engine.grammar import Grammars, check_format

    directory = resolve_base(None)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    started = time.monotonic()
    grammars = Grammars(tokenizer, AutoConfig.from_pretrained(directory).vocab_size, frozenset({tokenizer.eos_token_id}))
    grammars.wait_ready()
    setup = time.monotonic() - started
    fmt = check_format("json_schema", json.dumps(SCHEMA_20))
    started = time.monotonic()
    grammars.compile(fmt)
    cold = time.monotonic() - started
    cached = []
    for _ in range(repeats):
        # The same schema spaced otherwise: the canonical key still hits.
        again = check_format("json_schema", json.dumps(SCHEMA_20, indent=2))
        started = time.monotonic()
        grammars.compile(again)
        cached.append(time.monotonic() - started)
    return {"figure": "compile_20_fields", "tokenizer_info_s": round(setup, 3), "cold_ms": round(cold * 1e3, 2),
            "cached_ms": round(statistics.median(cached) * 1e3, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    print(json.dumps(compile_times()), flush=True)
    from tests.conftest import start_server

    server = start_server("--http-port", "0", "--max-batch-size", "8", "--max-seq-len", "256")
    try:
        throughput(server.http_url, 0, 4, 1)       # warm-up
        for constrained in (0, STREAMS // 4):
            print(json.dumps(throughput(server.http_url, constrained, args.max_tokens, args.rounds)), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
