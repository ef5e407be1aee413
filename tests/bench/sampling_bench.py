"""Sampling controls' cost and n's shared prefill: throughput of 8 concurrent streams with 0 % and 25 % rows
asking for penalties and a logit bias, and one request with n = 4 against 4 requests of the same long prompt.

    .venv/bin/python -m tests.bench.sampling_bench [--rounds 3] [--max-tokens 48]

Starts a real server (CPU by default) on loopback, speaks OpenAI HTTP to it, prints one JSON line per figure.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

STREAMS = 8
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": {"28": -5, "30": 3},
             "extra_body": {"repetition_penalty": 1.2}}
LONG_PROMPT = "The history of the printing press begins in many places at once. " * 40


def throughput(client, penalized: int, max_tokens: int, rounds: int) -> dict:
    def one(i: int) -> int:
        fields = PENALTIES if i < penalized else {}
        return client.completions.create(model="base", prompt=f"Story number {i}:", max_tokens=max_tokens,
                                         temperature=0, **fields).usage.completion_tokens

    def run() -> int:
        with ThreadPoolExecutor(STREAMS) as pool:
            return sum(pool.map(one, range(STREAMS)))

    rates = []
    for _ in range(rounds):
        started = time.monotonic()
        tokens = run()
        rates.append(tokens / (time.monotonic() - started))
    return {"figure": "throughput", "streams": STREAMS, "penalized_rows": penalized,
            "tokens_per_s": round(statistics.median(rates), 1), "rounds": [round(r, 1) for r in rates]}


def shared_prefill(client, rounds: int) -> list[dict]:
    """Seconds for 4 answers of 8 tokens to one long prompt: n = 4 (one prefill) and 4 requests at once."""
    fields = dict(model="base", prompt=LONG_PROMPT, max_tokens=8, temperature=1.0, seed=1)

    def together() -> int:
        return client.completions.create(n=4, **fields).usage.prompt_tokens

    def apart() -> int:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: client.completions.create(**fields).usage.prompt_tokens, range(4)))[0]

    out = []
    for name, run in (("n=4", together), ("4 requests", apart)):
        seconds = []
        for _ in range(rounds):
            started = time.monotonic()
            prompt_tokens = run()
            seconds.append(time.monotonic() - started)
        out.append({"figure": "four_answers_one_prompt", "how": name, "prompt_tokens": prompt_tokens,
                    "seconds": round(statistics.median(seconds), 3), "rounds": [round(s, 3) for s in seconds]})
    return out


def main() -> None:
    import openai

    from tests.conftest import start_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    server = start_server("--http-port", "0", "--max-batch-size", "8", "--max-seq-len", "1024")
    try:
        client = openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=600)
        throughput(client, 0, 4, 1)       # warm-up
        for penalized in (0, STREAMS // 4):
            print(json.dumps(throughput(client, penalized, args.max_tokens, args.rounds)), flush=True)
        for figure in shared_prefill(client, args.rounds):
            print(json.dumps(figure), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
