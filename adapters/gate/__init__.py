"""The gate: a candidate adapter version against the live one (and the base), on what it learned, what
it must retain and general ability; PASS only if every check holds.

    from adapters.gate import GateConfig, GateSuite, run_gate
    report = run_gate(candidate, live, None, suites, GateConfig.load(gate_file), out_dir)
    print(report.summary()); sys.exit(0 if report.passed else 1)
"""
from .config import GateConfig, GateConfigError
from .general_sets import GeneralSetError
from .report import GateReport
from .run import run_gate
from .suites import GateSuite

__all__ = ["GateConfig", "GateConfigError", "GateReport", "GateSuite", "GeneralSetError", "run_gate"]
