"""The gate file: what an update may not make worse, kept as YAML beside the domain's data.

Every key is optional; without a file the defaults below apply. Read and checked here once, into
frozen dataclasses, with errors that name the key (`retained.max_drop: must be >= 0, got -1`).
"""
from __future__ import annotations

import difflib
import re
import types
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Union, get_args, get_origin, get_type_hints

from ..formats.version_stats import CanaryLimits
from ..train.config import ConfigError
from .general_sets import SOURCES

MATCHES = ("exact", "contains", "regex")
QUANTIZATIONS = ("auto", "nf4", "none")
# Sets on which the default SmolLM2-135M-Instruct scores above chance (`cartridge gate-data measure
# --items 150`: PIQA 58.7 % vs 50, SIQA 41.3 % vs 33.3, CommonsenseQA 30.7 % vs 20; README, "The gate").
# BoolQ, MMLU and OpenBookQA sit at chance for it and would gate on noise.
SEPARATING_SETS = ("piqa", "siqa", "commonsenseqa")


class GateConfigError(ConfigError):
    """A gate-file key is unknown or out of range; the message names it."""


@dataclass(frozen=True, slots=True)
class Learned:
    target: float | None = None       # accuracy that passes without beating live; None: must improve on live


@dataclass(frozen=True, slots=True)
class Retained:
    max_drop: float = 1.0             # accuracy points a suite may lose against live
    max_loss_increase: float = 0.05   # relative rise of answer loss allowed on suites without answers to check


@dataclass(frozen=True, slots=True)
class GeneralText:
    tokens: int = 4096                # of Python's own docstrings (adapters/general_text.py)
    max_perplexity_increase: float = 0.10  # relative to live (to the base for a first version)
    max_kl: float | None = None       # mean per-token KL(base || candidate) in nats; None: reported only


@dataclass(frozen=True, slots=True)
class GeneralSets:
    sets: tuple[str, ...] = SEPARATING_SETS
    items: int = 150                  # per set, sampled with the seed; 0 = all (150: the gate's CPU budget)
    max_drop: float = 2.0             # accuracy points against live (the base for a first version), when the
                                      # drop's 95% interval also lies below zero


@dataclass(frozen=True, slots=True)
class SuiteRule:
    """Overrides for one suite by name; with `path`, also a suite of the user's own, gated as retained."""
    name: str
    path: Path | None = None
    match: str | None = None          # exact | contains | regex; None: the file's `match`
    pattern: str | None = None        # for regex: its first match (group 1 if any) must equal the answer
    max_drop: float | None = None
    target: float | None = None
    items: int | None = None


@dataclass(frozen=True, slots=True)
class GateConfig:
    seed: int = 0
    items: int = 200                  # per suite, sampled with the seed; 0 = all
    batch_size: int = 16
    max_seq_len: int = 512
    extra_answer_tokens: int = 8      # greedy answers run to the reference's length plus these
    bootstrap_resamples: int = 2000
    min_items: int = 300              # suites with fewer items get a warning: their intervals are wide
    match: str = "exact"
    pattern: str | None = None
    quantization: str = "auto"        # auto: as the candidate was trained (its training_report.json)
    device: str = "auto"              # auto, cpu, cuda or cuda:N
    reuse_scores: bool = True         # scores of unchanged models (base, live) come from the cache
    learned: Learned = Learned()
    retained: Retained = Retained()
    general_text: GeneralText = GeneralText()
    general_sets: GeneralSets = GeneralSets()
    suites: tuple[SuiteRule, ...] = ()
    # What aborts a canary of a version gated with this file, unless `release --abort-...` flags are given.
    canary: CanaryLimits = CanaryLimits()
    source: str | None = field(default=None, metadata={"internal": True})  # the file read, for the report

    def __post_init__(self) -> None:
        for key in ("items", "max_seq_len", "batch_size", "bootstrap_resamples", "extra_answer_tokens",
                    "min_items"):
            minimum = 0 if key in ("items", "min_items", "extra_answer_tokens") else 1
            _check(getattr(self, key) >= minimum, key, f"must be >= {minimum}, got {getattr(self, key)}")
        _check(self.match in MATCHES, "match", f"must be one of {list(MATCHES)}, got {self.match!r}")
        _check(self.quantization in QUANTIZATIONS, "quantization",
               f"must be one of {list(QUANTIZATIONS)}, got {self.quantization!r}")
        _check(self.learned.target is None or 0 <= self.learned.target <= 1, "learned.target",
               f"must be in [0, 1], got {self.learned.target}")
        for key, value in (("retained.max_drop", self.retained.max_drop),
                           ("retained.max_loss_increase", self.retained.max_loss_increase),
                           ("general_text.max_perplexity_increase", self.general_text.max_perplexity_increase),
                           ("general_sets.max_drop", self.general_sets.max_drop),
                           ("general_sets.items", self.general_sets.items)):
            _check(value >= 0, key, f"must be >= 0, got {value}")
        _check(self.general_text.tokens >= 256, "general_text.tokens",
               f"must be at least one 256-token window, got {self.general_text.tokens}")
        unknown = [name for name in self.general_sets.sets if name not in SOURCES]
        _check(not unknown, "general_sets.sets", f"unknown sets {unknown}; known: {list(SOURCES)}")
        names = [rule.name for rule in self.suites]
        _check(len(names) == len(set(names)), "suites", "a suite name is listed twice")
        _check_pattern("pattern", self.match, self.pattern)
        for i, rule in enumerate(self.suites):
            _check(rule.match is None or rule.match in MATCHES, f"suites[{i}].match",
                   f"must be one of {list(MATCHES)}, got {rule.match!r}")
            _check_pattern(f"suites[{i}].pattern", rule.match or self.match, rule.pattern or self.pattern)
            _check(rule.path is None or rule.path.is_file(), f"suites[{i}].path", f"no such file {rule.path}")

    @classmethod
    def load(cls, path: Path | None) -> "GateConfig":
        """The gate file at `path`, or the defaults when `path` is None. Relative paths are relative to the file."""
        if path is None:
            return cls()
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise GateConfigError(f"gate file {path}: cannot be read ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise GateConfigError(f"gate file {path}: not valid YAML ({err})") from None
        if not isinstance(raw, dict):
            raise GateConfigError(f"gate file {path}: expected a mapping of settings")
        values = _parse(cls, raw, "", Path(path).parent)
        return cls(**values, source=str(path))

    def rule(self, suite_name: str) -> SuiteRule:
        """The overrides for a suite, filled from the file-wide settings."""
        found = next((rule for rule in self.suites if rule.name == suite_name), SuiteRule(suite_name))
        return SuiteRule(suite_name, found.path, found.match or self.match, found.pattern or self.pattern,
                         self.retained.max_drop if found.max_drop is None else found.max_drop,
                         self.learned.target if found.target is None else found.target,
                         self.items if found.items is None else found.items)


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise GateConfigError(f"{key}: {message}")


def _check_pattern(key: str, match: str, pattern: str | None) -> None:
    if match != "regex":
        return
    _check(pattern is not None, key, "match: regex needs a pattern")
    try:
        re.compile(pattern)
    except re.error as err:
        raise GateConfigError(f"{key}: not a valid regular expression ({err})") from None


def _parse(cls, raw: dict, where: str, base: Path) -> dict:
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls) if not f.metadata.get("internal")]
    values = {}
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean '{where}{close[0]}'?" if close else f" (known: {', '.join(known)})"
            raise GateConfigError(f"unknown gate setting '{where}{key}'{hint}")
        values[key] = _value(hints[key], value, f"{where}{key}", base)
    return values


def _value(kind, value, key: str, base: Path):
    origin, args = get_origin(kind), get_args(kind)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        kind = next(arg for arg in args if arg is not type(None))
        origin, args = get_origin(kind), get_args(kind)
    if origin is tuple:
        if not isinstance(value, list):
            raise GateConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_value(args[0], item, f"{key}[{i}]", base) for i, item in enumerate(value))
    if isinstance(kind, type) and hasattr(kind, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise GateConfigError(f"{key}: expected a mapping, got {value!r}")
        if kind is SuiteRule and "name" not in value:
            raise GateConfigError(f"{key}.name: required")
        try:
            return kind(**_parse(kind, value, f"{key}.", base))
        except GateConfigError:
            raise
        except ValueError as err:   # CanaryLimits' words name its release flag: name the gate-file key instead
            flag, _, rest = str(err).partition(" ")
            raise GateConfigError(f"{key}.{flag.removeprefix('--abort-').replace('-', '_')}: "
                                  f"{rest.split(': ', 1)[-1]}") from None
    if kind is Path:
        return base / str(value)
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    raise GateConfigError(f"{key}: expected {kind.__name__}, got {value!r}")
