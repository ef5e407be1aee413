"""Serving benchmark: our server against transformers `generate` + peft, same model, prompts and settings.

    python -m tests.bench.serve_bench                  # embedded SmolLM2-135M, dense fp32, on this CPU
    python -m tests.bench.serve_bench --model 7b       # Llama-2-7B shape, random weights, NF4 on CUDA

Then the capacity cases (tests/bench/capacity_cases.py, each with its own server; --skip-capacity drops them,
--skip-standard runs only them):
many streams on as many adapters, long prompts arriving, a shared system prompt warm and cold, Zipf adapters.

Prints one JSON object and writes it to --out. Our figures come from the real server over gRPC
(tokenization, scheduling and streaming included); the peer's from `model.generate` in-process.
Each adapter is random rank-r LoRA on q,k,v,o (the peer script's recipe); speed does not depend
on weight values. A benchmark, not a test: it asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.formats.base_checkpoint import resolve_base
from client.client import CartridgeClient
from tests.conftest import start_server

from .serve_peer import peer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000),
}


def write_random_adapter(directory: Path, config, rank: int, seed: int) -> Path:
    """A peft-format adapter with random A and B for every layer's q, k, v, o."""
    from adapters.formats.adapter_dir import BaseShape

    shape = BaseShape.from_config(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(shape.num_layers):
        for projection in TARGETS:
            out_features, in_features = shape.projections[projection]
            key = f"base_model.model.model.layers.{layer}.self_attn.{projection}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * 0.01
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()},
              directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
        "target_modules": TARGETS, "lora_dropout": 0.0, "bias": "none"}))
    return directory


def random_checkpoint(shape: str, root: Path) -> Path:
    """A Llama checkpoint of a real shape with random weights, and a word-level tokenizer of its
    vocabulary with no end-of-sequence token, so every request runs to max_tokens as the peer's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    directory = root / f"llama-{shape}"
    if not (directory / "config.json").exists():
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, eos_token_id=None, bos_token_id=None)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory)
        (directory / "generation_config.json").unlink(missing_ok=True)
        del model
        torch.cuda.empty_cache()
        vocab = {f"w{i}": i for i in range(config.vocab_size)}
        words = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
        words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(directory)
    return directory


def timed_stream(client: CartridgeClient, prompt: str, adapter: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    for piece in client.generate_stream(prompt, adapter=adapter, max_tokens=max_tokens):
        first = first or time.perf_counter()
        last = piece
    end = time.perf_counter()
    return {"start": start, "first": first, "end": end, "tokens": last.completion_tokens}


def host_gap(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the server's cartridge_engine_host_gap_seconds: host time the device waited for."""
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return tuple(float(re.search(rf"^cartridge_engine_host_gap_seconds_{part} (\S+)$", text, re.M)[1])
                 for part in ("sum", "count"))


def ours(server, prompts: list[str], adapters: list[str], max_tokens: int) -> dict:
    """Concurrent streams, one per prompt; tokens/s counts the whole batch's generated tokens, and
    host_gap_ms is the mean host time per pass the device waited for (the engine's own histogram)."""
    gap_before = host_gap(server.metrics_url)
    with CartridgeClient(server.address, timeout=600) as client:
        with ThreadPoolExecutor(len(prompts)) as pool:
            runs = list(pool.map(lambda pa: timed_stream(client, pa[0], pa[1], max_tokens), zip(prompts, adapters)))
    tokens = sum(r["tokens"] for r in runs)
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    decode = max(r["end"] for r in runs) - max(r["first"] for r in runs)
    per_token = [(r["end"] - r["first"]) / max(r["tokens"] - 1, 1) for r in runs]
    gap_sum, gap_count = (after - before for after, before in zip(host_gap(server.metrics_url), gap_before))
    return {"tokens_per_s": round(tokens / wall, 1), "ms_per_output_token": round(1000 * sum(per_token) / len(runs), 2),
            "host_gap_ms": round(1000 * gap_sum / gap_count, 3) if gap_count else None,
            "ttft_ms": round(1000 * sum(r["first"] - r["start"] for r in runs) / len(runs), 1),
            "decode_only_tokens_per_s": round(len(runs) * (max_tokens - 1) / decode, 1) if decode > 0 else None}


def stall_during(address: str, prompts: list[str], adapters: list[str], max_tokens: int,
                 action: Callable[[CartridgeClient], None]) -> dict:
    """Streams decode while `action` runs once every stream is decoding: the longest gap between two tokens
    of any running stream in that window, against the median gap of the whole run."""
    arrivals: list[list[float]] = [[] for _ in prompts]
    window: dict[str, float] = {}

    def stream(i: int) -> None:
        with CartridgeClient(address, timeout=600) as client:
            for _ in client.generate_stream(prompts[i], adapter=adapters[i], max_tokens=max_tokens):
                arrivals[i].append(time.perf_counter())

    def act() -> None:
        while min(len(a) for a in arrivals) < max_tokens // 4:   # every stream is decoding
            time.sleep(0.005)
        with CartridgeClient(address, timeout=600) as client:
            window["start"] = time.perf_counter()
            action(client)
            window["end"] = time.perf_counter()

    with ThreadPoolExecutor(len(prompts) + 1) as pool:
        jobs = [pool.submit(stream, i) for i in range(len(prompts))] + [pool.submit(act)]
        for job in jobs:
            job.result()
    gaps = sorted(b - a for times in arrivals for a, b in zip(times, times[1:]))
    during = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b >= window["start"] and a <= window["end"]]
    return {"streams": len(prompts), "median_gap_ms": round(1000 * gaps[len(gaps) // 2], 2),
            "longest_gap_in_window_ms": round(1000 * max(during), 2) if during else None,
            "window_ms": round(1000 * (window["end"] - window["start"]), 1)}


def registration_stall(address: str, prompts: list[str], adapters: list[str], new_adapter: Path | None,
                       max_tokens: int) -> dict:
    """An operator registers a new adapter and sends its first request while streams decode. new_adapter
    None: the request uses an adapter already loaded instead (what admitting any new request costs)."""
    times: dict[str, float] = {}

    def register_and_use(client: CartridgeClient) -> None:
        start = time.perf_counter()
        if new_adapter is not None:
            client.register_adapter("fresh", str(new_adapter))
        times["registered"] = time.perf_counter()
        next(iter(client.generate_stream(prompts[0], adapter="fresh" if new_adapter else adapters[0], max_tokens=4)))
        times["register_ms"] = round(1000 * (times["registered"] - start), 1)
        times["first_token_of_new_adapter_ms"] = round(1000 * (time.perf_counter() - times["registered"]), 1)

    result = stall_during(address, prompts, adapters, max_tokens, register_and_use)
    return {**result, "register_ms": times["register_ms"],
            "first_token_of_new_adapter_ms": times["first_token_of_new_adapter_ms"]}


def random_prompts(tokenizer, vocab_size: int, count: int, length: int, seed: int) -> list[str]:
    """`count` prompts of random tokens that encode back to `length` tokens (or as near as the tokenizer allows)."""
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(100, min(vocab_size, 30000), (length,), generator=generator).tolist() for _ in range(count)]
    # Round trip through text so both sides see exactly the same token ids.
    prompts = [tokenizer.decode(p) for p in ids]
    return [tokenizer.decode(tokenizer.encode(p, add_special_tokens=False)[:length]) for p in prompts]


def standard_cases(args: argparse.Namespace, flags: list[str], prompts: list[str], streams: int, config, tokenizer,
                   work: Path) -> dict:
    """One server with `streams` adapters: one stream and all streams, on the base, one adapter and
    distinct adapters, then the stalls a new request and a registration cause."""
    started = time.perf_counter()
    server = start_server(*flags)
    result = {"ours_start_s": round(time.perf_counter() - started, 1), "server_flags": args.server_flag}
    try:
        names = [f"a{i}" for i in range(streams)]
        # warm-up: loads every adapter and warms the kernels, on other prompts than the runs' so that no
        # run starts from blocks the prefix cache kept
        ours(server, random_prompts(tokenizer, config.vocab_size, streams, args.prompt_tokens, seed=99), names, 4)
        result["ours"] = {
            "one_stream_base": ours(server, prompts[:1], [""], args.max_tokens),
            "one_stream_adapter": ours(server, prompts[:1], ["a0"], args.max_tokens),
            f"{streams}_streams_same_adapter": ours(server, prompts, ["a0"] * streams, args.max_tokens),
            f"{streams}_streams_distinct_adapters": ours(server, prompts, names, args.max_tokens),
            f"{streams}_streams_base": ours(server, prompts, [""] * streams, args.max_tokens),
        }
        fresh = write_random_adapter(work / "fresh", config, args.rank, seed=streams)
        half = max(1, streams // 2)
        for case, adapter in (("new_request_stall", None), ("registration_stall", fresh)):
            result["ours"][case] = registration_stall(server.address, prompts[:half], names[:half], adapter,
                                                      2 * args.max_tokens)
    except Exception:
        print("".join(server.log[-60:]), file=sys.stderr)
        raise
    finally:
        server.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("embedded", *SHAPES), default="embedded",
                        help="the embedded default base, or a Llama shape with random weights")
    parser.add_argument("--streams", type=int, help="concurrent requests (default: 32 on CUDA, else 8)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--quantization", choices=("nf4", "none"), help="server and peer (default: nf4 on CUDA)")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-standard", action="store_true", help="only the capacity cases (no peer either)")
    parser.add_argument("--server-flag", action="append", default=[],
                        help="extra flag for our server, e.g. --server-flag=--no-triton-kernels (repeatable)")
    parser.add_argument("--out", default="bench-results")
    from . import capacity_cases

    capacity_cases.add_flags(parser)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoTokenizer

    gpu = torch.cuda.is_available()
    streams = args.streams or (32 if gpu else 8)
    work = Path(tempfile.mkdtemp(prefix="cartridge-bench-"))
    model_dir = resolve_base(None) if args.model == "embedded" else random_checkpoint(args.model, Path("/tmp"))
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapter_dirs = [write_random_adapter(work / f"a{i}", config, args.rank, seed=i) for i in range(streams)]
    prompts = random_prompts(tokenizer, config.vocab_size, streams, args.prompt_tokens, seed=0)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    ids = [p for p in ids if len(p) == args.prompt_tokens] or ids
    result = {"model": model_dir.name, "device": torch.cuda.get_device_name(0) if gpu else "cpu",
              "torch": torch.__version__, "streams": streams, "rank": args.rank, "targets": TARGETS,
              "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens}
    quantize = args.quantization == "nf4" or (gpu and args.quantization is None)
    result["quantization"] = "nf4" if quantize else "none"
    common = ["--quantization", "nf4" if quantize else "none", "--dtype", "bfloat16" if gpu or quantize else "float32",
              "--base-model", str(model_dir), "--max-lora-rank", str(args.rank), *args.server_flag]
    flags = [*common, "--max-batch-size", str(streams), "--max-adapters", str(streams),
             "--max-seq-len", str(args.prompt_tokens * 2 + args.max_tokens + 16)]
    flags += [f for i, d in enumerate(adapter_dirs) for f in ("--adapter", f"a{i}={d}")]
    if not args.skip_standard:
        result.update(standard_cases(args, flags, prompts, streams, config, tokenizer, work))
    if not args.skip_capacity:
        result["capacity"] = capacity_cases.run(args, common, config, tokenizer, work)
    if not (args.skip_peer or args.skip_standard):
        device = "cuda" if gpu else "cpu"
        result["peer"] = peer(model_dir, adapter_dirs, {
            "one_stream_adapter": ([ids[0]], ["a0"]),
            f"{streams}_streams_distinct_adapters": (ids, [f"a{i}" for i in range(streams)]),
        }, args.max_tokens, device, quantize)
    print(json.dumps(result, indent=1))
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, f"serve_bench_{args.model}_{'cuda' if gpu else 'cpu'}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
