"""The gate: a candidate adapter version against the live one (and the base), on what it learned, what
it must retain and general ability; PASS only if every check holds.

    from adapters.gate import GateConfig, GateSuite, run_gate
    report = run_gate(candidate, live, None, suites, GateConfig.load(gate_file), out_dir)
    print(report.summary()); sys.exit(0 if report.passed else 1)
"""
from __future__ import annotations

import importlib

# The names load on first use (PEP 562): the `cartridge` command imports this package to register
# `gate-data`, and scoring pulls in torch, which the command's client half must never load.
_HOMES = {"GateConfig": "config", "GateConfigError": "config", "GeneralSetError": "general_sets",
          "GateReport": "report", "run_gate": "run", "GateSuite": "suites"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
