#!/usr/bin/env bash
# One device call: check the GPU kernels, then time every variant (BENCHMARKS.md, "Engine speed").
#   bash tests/bench/gpu_round.sh OUTDIR STEPS...      steps: tests sweep kernels decode serve serve_bnb peer
# Each step has its own time limit and log under OUTDIR, so one overrun leaves the others' figures.
# PEER: the peer script (shared/bench/peft_baseline.py, copied into the carried .carry/bench).
set -u
out=$1; shift
export PYTHONUNBUFFERED=1
# The copy is not pip-installed there: publish its `cartridge.commands` entry points (serve, ...) from
# pyproject.toml in a dist-info beside the carried wheels (first entry of PYTHONPATH).
python3 - <<'PY'
import os, pathlib, tomllib
site = pathlib.Path(os.environ["PYTHONPATH"].split(":")[0], "cartridge-0.1.0.dist-info")
site.mkdir(parents=True, exist_ok=True)
(site / "METADATA").write_text("Metadata-Version: 2.1\nName: cartridge\nVersion: 0.1.0\n")
commands = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]["cartridge.commands"]
(site / "entry_points.txt").write_text("[cartridge.commands]\n" + "".join(f"{k} = {v}\n" for k, v in commands.items()))
PY
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
step() { local name=$1 limit=$2; shift 2; echo "== $name ($(date -u +%T))"
         timeout "$limit" "$@" > "$out/$name.log" 2>&1; echo "== $name rc=$? ($(date -u +%T))"; tail -n 25 "$out/$name.log"; }
for s in "$@"; do case $s in
  tests)     step tests 300 python3 -m pytest -q tests/test_kernels_gpu.py tests/test_decode_kernels_gpu.py \
                  tests/test_cuda_graphs.py ;;
  sweep)     step sweep 240 python3 -m tests.bench.kernel_bench --shapes 7b --rows 8 32 --sweep --out "$out" ;;
  kernels)   step kernels 150 python3 -m tests.bench.kernel_bench --out "$out" ;;
  decode)    step decode 260 python3 -m tests.bench.decode_bench --model 7b --out /tmp/bench ;;
  serve)     step serve 200 python3 -m tests.bench.serve_bench --model 7b --skip-peer --out /tmp/bench ;;
  serve_bnb) step serve_bnb 150 python3 -m tests.bench.serve_bench --model 7b --skip-peer --out /tmp/bench-bnb \
                  --server-flag=--no-triton-kernels ;;
  peer)      step peer 330 python3 "${PEER:-.carry/bench/peft_baseline.py}" 7b "$out" ;;
esac; done
