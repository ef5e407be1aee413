"""serve_bench's capacity cases: many streams on many adapters, long prompts arriving while streams decode,
a shared system prompt warm and cold, and thousands of adapters with Zipf popularity over few device slots.

Run by `python -m tests.bench.serve_bench` (skip with --skip-capacity); each case starts its own server.
"""
from __future__ import annotations

import argparse
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from client.client import CartridgeClient
from tests.conftest import start_server

from .serve_bench import ours, random_prompts, stall_during, write_random_adapter


def add_flags(parser: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    parser.add_argument("--skip-capacity", action="store_true")
    parser.add_argument("--capacity-streams", type=int, nargs="+", default=[32, 128, 256] if gpu else [2, 4],
                        help="streams x as many distinct adapters, each count in the same server")
    parser.add_argument("--long-prompt-tokens", type=int, default=1000 if gpu else 200)
    parser.add_argument("--zipf-adapters", type=int, default=2000 if gpu else 40)
    parser.add_argument("--zipf-slots", type=int, default=64 if gpu else 4)
    parser.add_argument("--zipf-files", type=int, default=16,
                        help="distinct adapter files behind the Zipf names (each name is its own adapter)")


def run(args: argparse.Namespace, common: list[str], config, tokenizer, work: Path) -> dict:
    """common: the server flags every case shares (base, quantization, dtype, rank, extra --server-flag)."""
    most = max(args.capacity_streams)
    # 2,048 as the figures are stated: with paging, a longer limit reserves nothing
    seq_len = str(max(2048, args.long_prompt_tokens + args.prompt_tokens + args.max_tokens + 64))
    names = [f"c{i}" for i in range(most)]
    adapter_flags = [f for i, name in enumerate(names) for f in
                     ("--adapter", f"{name}={write_random_adapter(work / name, config, args.rank, seed=1000 + i)}")]
    prompts = random_prompts(tokenizer, config.vocab_size, most, args.prompt_tokens, seed=1)
    result = {}
    server = start_server(*common, "--max-batch-size", str(most), "--max-adapters", str(most), "--max-seq-len", seq_len,
                          *adapter_flags)
    try:
        # warm-up: every adapter into its slot, on other prompts (no run starts from cached blocks)
        ours(server, random_prompts(tokenizer, config.vocab_size, most, args.prompt_tokens, seed=99), names, 4)
        for count in args.capacity_streams:
            result[f"{count}_streams_{count}_adapters"] = ours(server, prompts[:count], names[:count], args.max_tokens)
        result["long_prompts_arrive"] = long_prompts_arrive(server.address, prompts, names, tokenizer, config, args)
        result["shared_system_prompt_ttft"] = shared_prefix_ttft(server.address, tokenizer, config, args)
    finally:
        server.stop()
    result["zipf"] = zipf_swapping(args, common, config, tokenizer, work, seq_len)
    return result


def long_prompts_arrive(address: str, prompts: list[str], names: list[str], tokenizer, config,
                        args: argparse.Namespace) -> dict:
    """Eight prompts of --long-prompt-tokens arrive at once while streams decode (--streams of them)."""
    longs = random_prompts(tokenizer, config.vocab_size, 8, args.long_prompt_tokens, seed=2)
    streams = min(args.streams or 32, len(prompts))

    def arrive(client: CartridgeClient) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: client.generate(p, adapter=names[0], max_tokens=2), longs))

    return stall_during(address, prompts[:streams], names[:streams], 4 * args.max_tokens, arrive)


def shared_prefix_ttft(address: str, tokenizer, config, args: argparse.Namespace) -> dict:
    """Time to first token of a request whose --long-prompt-tokens system prompt nobody sent before (cold),
    then of requests with the same system prompt and another question (warm: its blocks are cached)."""
    system = random_prompts(tokenizer, config.vocab_size, 1, args.long_prompt_tokens, seed=3)[0]
    questions = random_prompts(tokenizer, config.vocab_size, 6, 16, seed=4)

    def ttft(prompt: str) -> float:
        start = time.perf_counter()
        with CartridgeClient(address, timeout=600) as client:
            next(iter(client.generate_stream(prompt, max_tokens=2)))
        return 1000 * (time.perf_counter() - start)

    cold = ttft(system + questions[0])
    warm = sorted(ttft(system + q) for q in questions[1:])
    return {"prompt_tokens": args.long_prompt_tokens, "cold_ms": round(cold, 1),
            "warm_median_ms": round(warm[len(warm) // 2], 1), "warm_over_cold": round(warm[len(warm) // 2] / cold, 3)}


def zipf_swapping(args: argparse.Namespace, common: list[str], config, tokenizer, work: Path, seq_len: str) -> dict:
    """Tokens/s of --zipf-slots streams over --zipf-adapters names drawn with Zipf popularity (alpha 1), adapters
    moving between host and device while streams run, against the same streams over --zipf-slots names that
    all stay resident."""
    files = [write_random_adapter(work / f"z{i}", config, args.rank, seed=2000 + i) for i in range(args.zipf_files)]
    slots, streams = args.zipf_slots, args.zipf_slots
    weights = [1 / (k + 1) for k in range(args.zipf_adapters)]
    rounds = 4
    drawn = [random.Random(r).choices(range(args.zipf_adapters), weights, k=streams) for r in range(rounds)]
    # fresh prompts each round: no round starts from blocks an earlier one left in the prefix cache
    prompts = [random_prompts(tokenizer, config.vocab_size, streams, args.prompt_tokens, seed=5 + r)
               for r in range(rounds)]
    result = {"adapters": args.zipf_adapters, "slots": slots, "streams": streams, "rounds": rounds}
    for case, count in (("all_resident", slots), ("zipf", args.zipf_adapters)):
        server = start_server(*common, "--max-batch-size", str(streams), "--max-adapters", str(slots),
                              "--max-seq-len", seq_len, "--max-host-adapter-bytes", "8GiB")
        try:
            started = time.perf_counter()
            with CartridgeClient(server.address, timeout=600) as client:
                for i in range(count):
                    client.register_adapter(f"z{i}", str(files[i % len(files)]))
            registered = time.perf_counter() - started
            runs = [ours(server, round_prompts, [f"z{i % count}" for i in draw], args.max_tokens)
                    for round_prompts, draw in zip(prompts, drawn)]
        finally:
            server.stop()
        result[case] = {"register_s": round(registered, 1),
                        "tokens_per_s": round(sum(r["tokens_per_s"] for r in runs) / rounds, 1)}
    result["zipf_over_resident"] = round(result["zipf"]["tokens_per_s"] / result["all_resident"]["tokens_per_s"], 3)
    return result
