"""Decode step benchmark: GPU time of one graph replay, and the host time a step adds on top.

    python -m tests.bench.decode_bench --model 7b       # both our kernels, our LoRA kernel alone, bnb + torch

Needs CUDA. Loads the model as the server does (random weights of a Llama shape, NF4), fills every
adapter slot with a random rank-16 q/k/v/o adapter, and for 1, 8 and 32 rows, each on its own
adapter, reports: `replay_ms`, the median GPU time of one decode graph replay (events around
replays, no host work); `step_ms`, the median wall time of `ModelRunner.launch` + `collect` as the
engine calls them; and `host_ms` = step − replay, the host time not hidden behind the GPU.
`--profile-rows 32` adds the kernels that take a 32-row replay's time. `--prefill N` adds one eager pass
of N new 64-token prompts, each on its own adapter (what a burst of new requests costs before their
first tokens): its median wall time and the kernels that take it.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from tests.bench.kernel_bench import median_replay_ms
from tests.bench.serve_bench import SHAPES, random_checkpoint

RANK = 16
# (Triton kernels, largest batch for our NF4 kernel): both kernels, LoRA kernel only, neither
VARIANTS = {"kernels": (True, 64), "lora_kernel": (True, 0), "bnb": (False, 0)}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def kernel_shares(graph: torch.cuda.CUDAGraph, replays: int = 5) -> list[dict]:
    """Where a replay's GPU time goes, from the profiler's device trace of `replays` replays."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    return device_shares(prof, replays)


def device_shares(prof, runs: int = 1, top: int = 15) -> list[dict]:
    """The kernels with the most device time in a profile of `runs` runs: µs per run, calls per run, share."""
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"kernel": e.key[:90], "us_per_run": round(e.device_time_total / runs, 1), "calls": e.count // runs,
             "share": round(e.device_time_total / total, 3)} for e in events[:top]]


def prefill_pass(runner, prompts: int) -> dict:
    """Median wall time of one pass computing `prompts` new 64-token prompts on adapters 1..prompts, and the
    kernels of one more such pass, and their total device time."""
    from torch.profiler import ProfilerActivity, profile

    from tests.conftest import paged_sequences, run_pass

    def once() -> None:
        seqs = paged_sequences(runner, [list(range(100, 164))] * prompts, list(range(1, prompts + 1)))
        run_pass(runner, [(seq, len(seq.prompt_ids)) for seq in seqs])

    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        once()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        once()
        torch.cuda.synchronize()
    device_ms = sum(e.device_time_total for e in prof.key_averages()) / 1000
    # pass_ms well above device_ms: the pass waits on the host (launches, Python), not on the GPU.
    return {"prompts": prompts, "tokens": 64 * prompts, "pass_ms": round(1000 * median(times[1:]), 2),
            "device_ms": round(device_ms, 2), "kernels": device_shares(prof)}


def run(model_dir: Path, rows_list: list[int], context: int, kernels: bool, nf4_kernel_max_rows: int,
        profile_rows: int | None = None, prefill: int | None = None) -> dict:
    from transformers import AutoConfig

    from server.lora.slots import AdapterSlots
    from server.engine.cuda_graphs import DecodeGraphs
    from server.model.kv_cache import PagedKVCache
    from server.engine.runner import ModelRunner
    from server.model.weights import load_model
    from tests.conftest import paged_sequences, run_pass

    device = torch.device("cuda")
    config = AutoConfig.from_pretrained(model_dir)
    slots_needed = max(*rows_list, prefill or 0)
    model, stacks = load_model(model_dir, config, torch.bfloat16, device, True, slots_needed + 1, RANK,
                               kernels=kernels, nf4_kernel_max_rows=nf4_kernel_max_rows)
    for (_, projection), stack in stacks.items():
        if projection in TARGETS:
            for slot in range(1, slots_needed + 1):
                stack.load(slot, torch.randn(RANK, stack.a.shape[2]) / stack.a.shape[2] ** 0.5,
                           torch.randn(stack.b.shape[1], RANK) * 0.02)
    adapter_slots = AdapterSlots(stacks, slots_needed)
    adapter_slots.ranks.update({s: RANK for s in range(1, slots_needed + 1)})
    adapter_slots.projections.update({s: frozenset(TARGETS) for s in range(1, slots_needed + 1)})
    block_size, max_blocks = 16, -(-context // 16)
    cache = PagedKVCache(model.args.n_layers, 1 + slots_needed * max_blocks, block_size, model.args.n_kv_heads,
                         model.args.head_dim, torch.bfloat16, device)
    graphs = DecodeGraphs(model, cache, slots_needed, max_blocks, RANK, device)
    started = time.perf_counter()
    captured = graphs.capture_all()
    result = {"kernels": kernels, "nf4_kernel_max_rows": nf4_kernel_max_rows,
              "capture_all_s": round(time.perf_counter() - started, 1), "graphs": captured}
    runner = ModelRunner(model, cache, adapter_slots, device, graphs)
    for rows in rows_list:
        seqs = paged_sequences(runner, [list(range(100, 164))] * rows, list(range(1, rows + 1)), max_tokens=context)
        run_pass(runner, [(seq, len(seq.prompt_ids)) for seq in seqs])
        for seq in seqs:
            seq.output_ids.append(7)
        steps = []
        for _ in range(30):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for seq, token in zip(seqs, runner.collect(run_pass(runner, [(seq, 1) for seq in seqs], launch=True))[0]):
                seq.output_ids.append(token)
            steps.append(time.perf_counter() - start)
        bucket = next(b for b in graphs.block_buckets if b * block_size >= max(s.num_tokens for s in seqs))
        graph = graphs._graphs[(rows, bucket, frozenset(TARGETS))][0]
        step_ms, replay_ms = 1000 * median(steps[5:]), median_replay_ms(graph, 20)
        result[f"rows_{rows}"] = {"replay_ms": round(replay_ms, 3), "step_ms": round(step_ms, 3),
                                  "host_ms": round(step_ms - replay_ms, 3)}
        if rows == profile_rows:
            result[f"rows_{rows}"]["kernels"] = kernel_shares(graph)
        print(json.dumps({"kernels": kernels, "nf4_kernel_max_rows": nf4_kernel_max_rows, "rows": rows,
                          **result[f"rows_{rows}"]}), flush=True)
    if prefill:
        result["prefill"] = prefill_pass(runner, prefill)
        print(json.dumps({"kernels": kernels, **result["prefill"]}), flush=True)
    del model, stacks, graphs, runner, cache
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=SHAPES, default="7b")
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--context", type=int, default=256, help="KV-cache length per slot")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--profile-rows", type=int,
                        help="also list the kernels that take a replay's time at this many rows")
    parser.add_argument("--prefill", type=int, help="also time and profile one pass of this many new prompts")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    model_dir = random_checkpoint(args.model, Path("/tmp"))
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "model": args.model}
    for variant in args.variants:
        results[variant] = run(model_dir, args.rows, args.context, *VARIANTS[variant],
                               profile_rows=args.profile_rows, prefill=args.prefill)
    print(json.dumps(results, indent=1))
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, f"decode_bench_{args.model}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
