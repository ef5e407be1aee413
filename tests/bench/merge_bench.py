"""Merge benchmark: peak RSS and time of `cartridge merge` on a real-shape checkpoint.

    python -m tests.bench.merge_bench                   # embedded SmolLM2-135M (fp32 on disk)
    python -m tests.bench.merge_bench --verify          # the same with logit verification (the default there)
    python -m tests.bench.merge_bench --shape tiny      # 2-layer Llama shape, random weights: a smoke test
    python -m tests.bench.merge_bench --shape 7b        # Llama-2-7B shape, random bf16 weights: 13.5 GB on
                                                        # disk for the base and again for the output

Random checkpoints are generated tensor by tensor into 2 GB shards, so building one is bounded too.
The adapter is random rank-r LoRA on q, k, v, o. The merge runs as a user runs it, `cartridge merge`
in a child process, and its peak RSS is the kernel's high-water mark for that child (wait4), next to
the same for a child that only imports what the merge imports. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from adapters.formats.base_checkpoint import resolve_base
from adapters.formats.checkpoint_shards import CheckpointTensors, plan_shards, write_shards

from .serve_bench import SHAPES, write_random_adapter

IMPORTS_ONLY = "import torch, transformers, peft, safetensors, huggingface_hub; import adapters.merge.merge"


def random_checkpoint(shape: str, directory: Path) -> Path:
    """A bf16 Llama checkpoint of a real shape with random weights, written one tensor at a time."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, dtype=torch.bfloat16)
    with torch.device("meta"):
        specs = {name: t.to(torch.bfloat16) for name, t in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)

    def produce(name: str) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(specs[name].shape, dtype=torch.bfloat16)
        return torch.empty(specs[name].shape).normal_(std=0.02, generator=generator).to(torch.bfloat16)

    directory.mkdir(parents=True)
    write_shards(directory, plan_shards(specs, "2GB"), produce, metadata={})
    config.save_pretrained(directory)
    return directory


# Linux starts a child's peak RSS at its parent's size (fork copies the parent's memory map), so
# children are started from this small torch-free launcher, never from the benchmark itself, which
# by then holds torch and has just built a checkpoint.
LAUNCHER = """import json, os, subprocess, sys, time
with open(sys.argv[1], "w") as log:
    started = time.perf_counter()
    child = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(child.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_kib": usage.ru_maxrss,
                  "exit_status": os.waitstatus_to_exitcode(status)}))"""


def measured(command: list[str]) -> dict:
    """Runs a child; its wall time, peak RSS and exit status, and the last lines it printed."""
    with tempfile.NamedTemporaryFile("r") as log:
        launched = subprocess.run([sys.executable, "-c", LAUNCHER, log.name, *command], capture_output=True,
                                  text=True, check=True)
        tail = log.read().strip().splitlines()[-2:]
    figures = json.loads(launched.stdout)
    return {"seconds": round(figures["seconds"], 1), "peak_rss_gib": round(figures["peak_rss_kib"] / 2**20, 2),
            "exit_status": figures["exit_status"], "output": tail}


def directory_gb(directory: Path) -> float:
    return round(sum(f.stat().st_size for f in directory.glob("*.safetensors")) / 1e9, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("embedded", *SHAPES), default="embedded",
                        help="the embedded default base, or a Llama shape with random weights")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bf16", help="of the merged weights")
    parser.add_argument("--weights-source", default="dense")
    parser.add_argument("--max-shard-size", default="2GB", help="of the merged output: peak RSS follows it")
    parser.add_argument("--verify", action="store_true", help="verify logits (needs two float32 models, in turn)")
    parser.add_argument("--work", type=Path, help="where the checkpoint and the output go (default: a temp dir)")
    args = parser.parse_args()
    from transformers import AutoConfig

    work = Path(tempfile.mkdtemp(prefix="cartridge-merge-bench-", dir=args.work))
    try:
        started = time.perf_counter()
        base = resolve_base(None) if args.shape == "embedded" else random_checkpoint(args.shape, work / "base")
        build_seconds = time.perf_counter() - started
        config = AutoConfig.from_pretrained(base)
        adapter = write_random_adapter(work / "adapter", config, args.rank, seed=0)
        merge = measured([sys.executable, "-m", "client.cli", "merge", "--base", str(base), "--adapter", str(adapter),
                          "--out", str(work / "merged"), "--dtype", args.dtype, "--weights-source",
                          args.weights_source, "--max-shard-size", args.max_shard_size,
                          "--verify" if args.verify else "--no-verify"])
        imports = measured([sys.executable, "-c", IMPORTS_ONLY])
        base_gb = directory_gb(base)
        result = {
            "shape": args.shape, "base": base.name if args.shape == "embedded" else f"random {args.shape}",
            "params": sum(t.numel() for t in CheckpointTensors(base).meta().values()),
            "base_gb_on_disk": base_gb,
            "output_gb": directory_gb(work / "merged") if merge["exit_status"] == 0 else None,
            "rank": args.rank, "dtype": args.dtype, "weights_source": args.weights_source, "verify": args.verify,
            "max_shard_size": args.max_shard_size,
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "build_seconds": round(build_seconds, 1),
            "build_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "merge": merge, "imports_only_peak_rss_gib": imports["peak_rss_gib"],
            "merge_peak_rss_over_base_size": round(merge["peak_rss_gib"] * 2**30 / 1e9 / base_gb, 2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=1))
    sys.exit(merge["exit_status"])


if __name__ == "__main__":
    main()
