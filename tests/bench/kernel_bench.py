"""NF4 matmul kernel benchmark: ours (server/kernels/nf4_matmul) against bitsandbytes and bf16 cuBLAS.

    python -m tests.bench.kernel_bench                    # 7B and 1B shapes, M = 1..64, default launch shapes
    python -m tests.bench.kernel_bench --sweep            # also tries a grid of launch shapes per (shape, M)
    mkdir /tmp/prev && git show REV:server/kernels/nf4_matmul.py > /tmp/prev/nf4_matmul.py
    git show REV:server/kernels/nf4_matmul.cu > /tmp/prev/nf4_matmul.cu      # (a CUDA-kernel commit)
    python -m tests.bench.kernel_bench --previous /tmp/prev/nf4_matmul.py    # an earlier commit's kernel beside

Needs CUDA. Every figure is the median over replays of a CUDA graph of 24 calls that rotate over
enough weight copies to miss the L2, so it is HBM time without launch gaps. TB/s counts the packed
NF4 bytes (0.5 byte a weight) for ours and bnb, as the targets do (our fp16 block scales add 1/16 on
top), and the bf16 bytes for cuBLAS. "copy" is the card's device-to-device copy rate measured in the
same run (bytes read + written), so "% copy" reads directly against the floor. Prints a table,
writes JSON to --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
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


def copy_tbps() -> float:
    """The card's device-to-device copy rate, bytes read + written, of a 2 GiB tensor (median of 10)."""
    src = torch.randn(2 ** 29, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return round(2 * src.numel() * 4 / sorted(times)[5] / 1e9, 2)


def resources(m: int, n: int, k: int) -> str:
    """Registers and local-memory bytes a thread of the default launch uses (spills show as local bytes)."""
    import ctypes
    import math

    from server.kernels.nf4_matmul import MAX_TILE_ROWS, _module, default_config

    config = default_config(m, n, k)
    kernel = _module(math.ceil(min(m, MAX_TILE_ROWS) / 8), config, False, config.split_k > 1).nf4_matmul
    driver = torch.cuda._utils._get_gpu_runtime_library()
    values = []
    for attribute in (4, 3):            # CU_FUNC_ATTRIBUTE_NUM_REGS, CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
        value = ctypes.c_int()
        driver.cuFuncGetAttribute(ctypes.byref(value), attribute, kernel.func)
        values.append(value.value)
    return f"{values[0]} registers, {values[1]} local bytes"


def sweep_configs(m: int, n: int):
    from server.kernels.nf4_matmul import NF4Config

    slabs = (1, 2) if (n // 16) % 2 == 0 else (1,)
    groups = (1, 2) if m <= 32 else (1,)
    for warps, slab, group, split, table in itertools.product((4, 8), slabs, groups, (2, 4, 8), (False, True)):
        yield NF4Config(warps, slab, group, 3, split, table)


def load_previous(path: str):
    """An earlier nf4_matmul.py: the CUDA kernel (its .cu beside it; it imports server.kernels' layout,
    which has not changed since) or the older Triton kernel."""
    spec = importlib.util.spec_from_file_location("server.kernels.previous_nf4", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def bench_shape(n: int, k: int, rows, sweep: bool, previous) -> list[dict]:
    import bitsandbytes as bnb

    from adapters.formats import nf4
    from server.kernels.nf4_layout import decode_absmax, repack
    from server.kernels.nf4_matmul import default_config, nf4_matmul

    copies = max(2, int(4 * 60e6 / (n * k / 2)) + 1)          # NF4 copies that overflow the L2 4x
    weights = [nf4.quantize(torch.randn(n, k, device="cuda"), torch.bfloat16) for _ in range(copies)]
    ours_packed = [repack(p.view(-1), decode_absmax(s), s.code, n, k, torch.bfloat16) for p, s in weights]
    previous_args = [(p.view(-1), decode_absmax(s), s.code.float().contiguous()) for p, s in weights]
    dense_copies = max(2, int(4 * 60e6 / (n * k * 2)) + 1)
    dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(dense_copies)]
    results = []
    for m in rows:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def ours(config, i):
            return lambda: nf4_matmul(x, ours_packed[i % copies], config)

        row = {"n": n, "k": k, "m": m, "default_config": str(default_config(m, n, k))}
        row["ours_us"] = graph_time_us([ours(None, i) for i in range(CALLS)])
        row["resources"] = resources(m, n, k)
        if previous is not None:
            if hasattr(previous, "NF4Config"):
                calls = [(lambda p=ours_packed[i % copies]: previous.nf4_matmul(x, p)) for i in range(CALLS)]
            else:
                calls = [(lambda a=previous_args[i % copies]: previous.nf4_matmul(x, *a, n)) for i in range(CALLS)]
            row["previous_us"] = graph_time_us(calls)
        row["bnb_us"] = graph_time_us([
            (lambda p=p, s=s: bnb.matmul_4bit(x, p.t(), quant_state=s)) for p, s in
            (weights[i % copies] for i in range(CALLS))])
        row["cublas_bf16_us"] = graph_time_us([(lambda w=dense[i % dense_copies]: F.linear(x, w))
                                               for i in range(CALLS)])
        if sweep:
            timed = []
            for config in sweep_configs(m, n):
                try:
                    timed.append((graph_time_us([ours(config, i) for i in range(CALLS)]), config))
                except Exception as err:  # noqa: BLE001 - a launch shape the card rejects is skipped
                    print(f"  {config}: {type(err).__name__} {err}")
            best = min(timed, key=lambda t: t[0])
            row["best_us"], row["best_config"] = best[0], str(best[1])
            row["swept"] = [(us, str(config)) for us, config in timed]
        packed_bytes, dense_bytes = n * k / 2, n * k * 2
        for key in ("ours", "previous", "bnb", "best"):
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
    parser.add_argument("--previous", help="an earlier commit's nf4_matmul.py to time beside ours")
    parser.add_argument("--out", default="bench-results")
    args = parser.parse_args()
    torch.manual_seed(0)
    previous = load_previous(args.previous) if args.previous else None
    copy = copy_tbps()
    print(f"{torch.cuda.get_device_name(0)}: device-to-device copy {copy} TB/s", flush=True)
    results = []
    for model in args.shapes:
        for name, (n, k) in SHAPES[model].items():
            for row in bench_shape(n, k, args.rows, args.sweep, previous):
                results.append({"model": model, "projection": name, **row})
    header = "| shape | N x K | M | ours µs | ours TB/s | % copy |"
    header += " previous µs | previous TB/s |" if previous else ""
    header += " bnb µs | bnb TB/s | bf16 cuBLAS µs | cuBLAS TB/s |"
    print(header + (" best swept µs | best TB/s | best launch |" if args.sweep else ""))
    for r in results:
        line = (f"| {r['model']} {r['projection']} | {r['n']}x{r['k']} | {r['m']} | {r['ours_us']:.1f} | "
                f"{r['ours_tbps']} | {100 * r['ours_tbps'] / copy:.0f} % |")
        if previous:
            line += f" {r['previous_us']:.1f} | {r['previous_tbps']} |"
        line += f" {r['bnb_us']:.1f} | {r['bnb_tbps']} | {r['cublas_bf16_us']:.1f} | {r['cublas_bf16_tbps']} |"
        if args.sweep:
            line += f" {r['best_us']:.1f} | {r['best_tbps']} | {r['best_config']} |"
        print(line)
    os.makedirs(args.out, exist_ok=True)
    Path(args.out, "kernel_bench.json").write_text(json.dumps({
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "copy_tbps": copy,
        "results": results}, indent=1))


if __name__ == "__main__":
    main()
