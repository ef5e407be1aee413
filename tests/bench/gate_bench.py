"""How long the gate takes with its defaults on the default model: one candidate against a live version.

    python -m tests.bench.gate_bench            # cold (every general-set choice computed), then warm

The live and candidate adapters are random (r=16 on all seven projections, B ~ N(0, 0.02)): the gate's
cost does not depend on what the weights learned. Suites are the shipped sample test sets: records
(80 rows, learned) and facts (60 rows, retained); everything else is the default gate file: 4,096
tokens of general text and 150 items of each default general set. The cold run computes the base's,
the live version's and the candidate's choices on the general sets; the warm run gates a new candidate
against the same live version and finds the other two in the cache, as every gate after a domain's
first does. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from adapters.formats.base_checkpoint import resolve_base
from adapters.gate import GateConfig, GateSuite, run_gate

from ..conftest import make_peft_adapter

SAMPLES = Path(__file__).resolve().parents[2] / "adapters" / "sample_data"
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gate_bench.json")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    root = Path(tempfile.mkdtemp(prefix="gate-bench-"))
    base = AutoModelForCausalLM.from_pretrained(resolve_base(None), dtype=torch.float32)
    live = make_peft_adapter(base, root / "live", 16, ALL_PROJECTIONS, seed=1, b_std=0.02)
    candidates = {"cold": make_peft_adapter(base, root / "candidate", 16, ALL_PROJECTIONS, seed=2, b_std=0.02),
                  "warm": make_peft_adapter(base, root / "next", 16, ALL_PROJECTIONS, seed=3, b_std=0.02)}
    del base
    suites = [GateSuite("records", SAMPLES / "records" / "test.jsonl", "learned"),
              GateSuite("facts", SAMPLES / "facts" / "test.jsonl", "retained")]
    runs = {}
    for name, reuse in (("cold", False), ("warm", True)):
        config = dataclasses.replace(GateConfig.load(None), reuse_scores=reuse)
        wall, cpu = time.monotonic(), _cpu_seconds()
        report = run_gate(candidates[name], live, None, suites, config, root / name)
        runs[name] = {"wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(_cpu_seconds() - cpu, 1),
                      "passed": report.passed, "failed": list(report.failed)}
        print(report.summary(), flush=True)
    result = {"runs": runs, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "load_average_1min_at_end": os.getloadavg()[0], "reports": str(root)}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
