"""The gate's verdict, and the three files it leaves: report.json, report.md and report.png."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .checks import Check

JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "report.json", "report.md", "report.png"
_USERS = "the user's own data"


@dataclass(frozen=True, slots=True)
class GateReport:
    candidate: str
    live: str | None
    base: dict                         # path, fingerprint, quantization, device
    checks: tuple[Check, ...]
    data: tuple[dict, ...]             # every file measured: path or wheel member, sha256, licence, items
    settings: dict                     # the gate file's values, as applied
    warnings: tuple[str, ...]
    duration_s: float
    libraries: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> tuple[str, ...]:
        return tuple(check.name for check in self.checks if not check.passed)

    def summary(self) -> str:
        """PASS or FAIL first, then one line per check; the failed ones are named again at the end."""
        against = f"live {self.live}" if self.live else "the base (first version)"
        lines = [f"{'PASS' if self.passed else 'FAIL'}: candidate {self.candidate} against {against}, "
                 f"{len(self.checks)} checks in {self.duration_s:.0f} s"]
        lines += [f"  {'PASS' if check.passed else 'FAIL'} {check.name} ({check.items} items): {check.verdict}"
                  for check in self.checks]
        lines += [f"  warning: {warning}" for warning in self.all_warnings]
        if not self.passed:
            lines.append(f"failed: {', '.join(self.failed)}")
        return "\n".join(lines)

    @property
    def all_warnings(self) -> tuple[str, ...]:
        return self.warnings + tuple(f"{check.name}: {w}" for check in self.checks for w in check.warnings)

    def to_dict(self) -> dict:
        return {"passed": self.passed, "failed": list(self.failed), "candidate": self.candidate, "live": self.live,
                "base": self.base, "duration_s": self.duration_s, "warnings": list(self.all_warnings),
                "checks": [asdict(check) for check in self.checks], "data": list(self.data),
                "settings": self.settings, "libraries": self.libraries}

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / JSON_FILE).write_text(json.dumps(self.to_dict(), indent=1))
        (out_dir / MARKDOWN_FILE).write_text(self.markdown())
        write_plot(out_dir / PLOT_FILE, self.checks)

    def markdown(self) -> str:
        lines = [f"# Gate: {'PASS' if self.passed else 'FAIL'}", "",
                 f"- candidate: `{self.candidate}`", f"- live: `{self.live}`" if self.live else
                 "- live: none (first version, compared with the base)",
                 f"- base: `{self.base['path']}` (fingerprint `{self.base['fingerprint'][:16]}`, "
                 f"quantization {self.base['quantization']}, {self.base['device']})",
                 f"- duration: {self.duration_s:.0f} s", ""]
        if not self.passed:
            lines += [f"**Failed:** {', '.join(self.failed)}", ""]
        lines += ["| check | items | verdict | figures |", "| --- | --- | --- | --- |"]
        lines += [f"| `{check.name}` | {check.items} | {'PASS' if check.passed else '**FAIL**'} | "
                  f"{_cell(check.verdict)} |" for check in self.checks]
        if self.all_warnings:
            lines += ["", "## Warnings", ""] + [f"- {_cell(warning)}" for warning in self.all_warnings]
        flips = [flip for check in self.checks for flip in check.flips]
        lines += ["", f"## Right to wrong ({len(flips)})", ""]
        if flips:
            lines += ["| check | prompt | expected | before | candidate |", "| --- | --- | --- | --- | --- |"]
            lines += [f"| `{f.check}` | {_cell(f.prompt)} | {_cell(f.expected)} | {_cell(f.before)} | "
                      f"{_cell(f.after)} |" for f in flips]
        else:
            lines.append("None: every item the reference answered right, the candidate answers right too.")
        lines += ["", "## Data", "", "| file | sha256 | licence | items |", "| --- | --- | --- | --- |"]
        lines += [f"| `{entry['file']}` | `{entry['sha256'][:16]}…` | {_cell(entry.get('licence', _USERS))} "
                  f"| {entry.get('items', '')} |" for entry in self.data]
        return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text safe inside one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ⏎ ")


def write_plot(path: Path, checks: tuple[Check, ...]) -> None:
    """Per-check change of the candidate against its reference, with the 95% interval: accuracy checks
    (suites and general sets) in points on the left, suites of raw text in nats of answer loss on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = [c for c in checks if c.changes and c.changes[0].unit == "points"]
    other = [c for c in checks if c.changes and c.changes[0].unit == "nats"]
    figure, axes = plt.subplots(1, 2, figsize=(11, 0.5 * max(len(accuracy), len(other), 3) + 1.6), dpi=100,
                                gridspec_kw={"width_ratios": [3, 2]})
    for axis, group, unit in ((axes[0], accuracy, "accuracy change vs reference (points)"),
                              (axes[1], other, "answer-loss change vs reference (nats)")):
        for row, check in enumerate(group):
            change = check.changes[0]
            colour = "tab:green" if check.passed else "tab:red"
            axis.errorbar(change.change, row, xerr=[[change.change - change.interval[0]],
                                                    [change.interval[1] - change.change]],
                          fmt="o", color=colour, capsize=4)
        axis.set_yticks(range(len(group)), [f"{c.name} ({c.items})" for c in group])
        axis.axvline(0, color="grey", linewidth=1)
        axis.set_xlabel(unit)
        axis.invert_yaxis()
        if not group:
            axis.text(0.5, 0.5, "none", transform=axis.transAxes, ha="center", color="grey")
    figure.suptitle("Gate: candidate minus reference, with 95% paired bootstrap intervals (red: failed)")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
