"""NF4 matmul kernel benchmark: ours (server/kernels/nf4_matmul) against bitsandbytes and bf16 cuBLAS.

    python -m tests.bench.kernel_bench                    # 7B and 1B shapes, M = 1..64, default launch shapes
    python -m tests.bench.kernel_bench --sweep            # also tries a grid of launch shapes per (shape, M)

Needs CUDA. Every figure is the median over replays of a CUDA graph of 24 calls that rotate over
enough weight copies to miss the 60 MB L2, so it is HBM time without launch gaps. TB/s counts the
packed NF4 bytes (0.5 byte a weight) for ours and bnb, as the issue's target does (our decoded fp32
absmax adds 1/8 on top), and the bf16 bytes for cuBLAS. Prints a table, writes JSON to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

# q|k|v and gate|up: the fused launches the server makes (server/model/linear.py)
SHAPES = {
    "7b": {"q/k/v/o": (4096, 4096), "q|k|v": (12288, 4096), "gate/up": (11008, 4096), "gate|up": (22016, 4096),
           "down": (4096, 11008)},
    "1b": {"q/o": (2048, 2048), "q|k|v": (2560, 2048), "gate/up": (5632, 2048), "gate|up": (11264, 2048),
           "down": (2048, 5632)},
}
ROWS = (1, 2, 4, 8, 16, 32, 64)
CALLS = 24


def graph_time_us(calls) -> float:
    """Median µs of one call, from replays of a graph that makes every call in `calls` once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    return 1000 * median_replay_ms(graph, 10) / len(calls)


def median_replay_ms(graph: torch.cuda.CUDAGraph, repeats: int) -> float:
    """Median GPU time of one replay, from device events around each."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def sweep_configs(m: int):
    from server.kernels.nf4_matmul import NF4Config

    if m == 1:
        for block_n, split_k, groups in itertools.product((32, 64, 128), (2, 4, 8), (1, 2, 4)):
            yield NF4Config(block_n, 1, split_k, groups)
        return
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    for block_n, split_k, groups, stages in itertools.product((64, 128), (2, 4, 8), (1, 2), (2, 3)):
        yield NF4Config(block_n, block_m, split_k, groups, num_stages=stages)


def bench_shape(n: int, k: int, rows, sweep: bool) -> list[dict]:
    import bitsandbytes as bnb

    from adapters.formats import nf4
    from server.kernels.nf4_matmul import decode_absmax, default_config, nf4_matmul

    copies = max(2, int(4 * 60e6 / (n * k / 2)) + 1)          # NF4 copies that overflow the L2 4x
    weights = [nf4.quantize(torch.randn(n, k, device="cuda"), torch.bfloat16) for _ in range(copies)]
    ours_args = [(p.view(-1), decode_absmax(s), s.code.float().contiguous()) for p, s in weights]
    dense_copies = max(2, int(4 * 60e6 / (n * k * 2)) + 1)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(dense_copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def ours(config, i):
            return lambda: nf4_matmul(x, *ours_args[i % copies], n, config)

        row = {"n": n, "k": k, "m": m, "default_config": str(default_config(m, n, k))}
        row["ours_us"] = graph_time_us([ours(None, i) for i in range(CALLS)])
        row["bnb_us"] = graph_time_us([
            (lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s)) for p, s in
            (weights[i % copies] for i in range(CALLS))])
        row["cublas_bf16_us"] = graph_time_us([(lambda w=dense[i % dense_copies]: F.linear(x, w))
                                               for i in range(CALLS)])
        if sweep:
            best = None
            for config in sweep_configs(m):
                try:
                    us = graph_time_us([ours(config, i) for i in range(CALLS)])
                except Exception as err:  # noqa: BLE001 - a launch shape the compiler rejects is skipped
                    print(f"  {config}: {type(err).__name__}")
                    continue
                if best is None or us < best[0]:
                    best = (us, config)
            row["best_us"], row["best_config"] = best[0], str(best[1])
        packed_bytes, dense_bytes = n * k / 2, n * k * 2
        for key in ("ours", "bnb", "best"):
            if f"{key}_us" in row:
                row[f"{key}_tbps"] = round(packed_bytes / row[f"{key}_us"] / 1e6, 2)
        row["cublas_bf16_tbps"] = round(dense_bytes / row["cublas_bf16_us"] / 1e6, 2)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    parser.add_argument("--sweep", action="store_true", help="time a grid of launch shapes too")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    for model in args.shapes:
        for name, (n, k) in SHAPES[model].items():
            for row in bench_shape(n, k, args.rows, args.sweep):
                results.append({"model": model, "projection": name, **row})
    header = "| shape | N x K | M | ours µs | ours TB/s | bnb µs | bnb TB/s | bf16 cuBLAS µs | cuBLAS TB/s |"
    print(header + (" best swept µs | best TB/s | best launch |" if args.sweep else ""))
    for r in results:
        line = (f"| {r['model']} {r['projection']} | {r['n']}x{r['k']} | {r['m']} | {r['ours_us']:.1f} | "
                f"{r['ours_tbps']} | {r['bnb_us']:.1f} | {r['bnb_tbps']} | {r['cublas_bf16_us']:.1f} | "
                f"{r['cublas_bf16_tbps']} |")
        if args.sweep:
            line += f" {r['best_us']:.1f} | {r['best_tbps']} | {r['best_config']} |"
        print(line)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "kernel_bench.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
