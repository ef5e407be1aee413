"""How a canary compares with the live version: the figures `cartridge canary` prints and the limits a
server's store follower aborts a canary by, read from the same Prometheus metrics (one server's, or the sum
of several), so what is shown is what is enforced.

Intervals are 95 %. Error rate: Wilson's score interval (right at 0 and at few requests, where the normal one
is not). Latency quantiles: Prometheus's histogram_quantile (linear within a bucket). Mean feedback: a normal
interval, and lower-mean tests are Welch's z, normal too: scipy is no dependency, and the abort limit takes at
least MIN_FEEDBACK_N = 30 ratings a side, where Student's t (>= 29 degrees of freedom) puts the one-sided 5 %
point at 1.70 against the normal 1.645, so the test aborts a truly equal canary about 5.5 % of the time, not 5 %.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

Z95, Z_ONE_SIDED_95 = 1.959964, 1.644854
MIN_FEEDBACK_N = 30
MIN_TPOT_N = 20          # TPOT observations a side before the TPOT limit is judged
ABORT_P = 0.05
REPLICA_LABEL = "replica"   # on the series of a Ray application's /metrics: which engine replica counted them


@dataclass
class VersionSample:
    """One version's counters, summed over servers; histograms as {upper bound: cumulative count}."""
    requests: float = 0
    errors: float = 0
    ttft: dict[float, float] = field(default_factory=dict)
    tpot: dict[float, float] = field(default_factory=dict)
    ratings: float = 0
    score_sum: float = 0
    score_squares: float = 0
    shadow: dict[str, float] = field(default_factory=dict)    # shadow pair sums, by metric (shadow versions)

    def minus(self, earlier: "VersionSample") -> "VersionSample":
        """What was counted since `earlier` (a snapshot of the same counters)."""
        return VersionSample(
            self.requests - earlier.requests, self.errors - earlier.errors, _minus(self.ttft, earlier.ttft),
            _minus(self.tpot, earlier.tpot), self.ratings - earlier.ratings, self.score_sum - earlier.score_sum,
            self.score_squares - earlier.score_squares, _minus(self.shadow, earlier.shadow))


def _minus(a: dict, b: dict) -> dict:
    return {k: v - b.get(k, 0) for k, v in a.items()}


_FIELDS = {"cartridge_release_requests_total": "requests", "cartridge_release_errors_total": "errors",
           "cartridge_feedback_ratings_total": "ratings", "cartridge_feedback_score_sum": "score_sum",
           "cartridge_feedback_score_squares_sum": "score_squares"}
_HISTOGRAMS = {"cartridge_release_ttft_seconds_bucket": "ttft", "cartridge_release_tpot_seconds_bucket": "tpot"}
SHADOW_PREFIX = "cartridge_shadow_"


def read_samples(texts: list[str], name: str) -> tuple[dict[str, VersionSample], dict[str, float]]:
    """Per version label of adapter `name`, its sample summed over the Prometheus texts; and the name's
    gauges (cartridge_live_version, cartridge_canary_version, ...) as the last text gives them."""
    from prometheus_client.parser import text_string_to_metric_families

    versions: dict[str, VersionSample] = {}
    gauges: dict[str, float] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("adapter") != name:
                    continue
                version = s.labels.get("version")
                if version is None:
                    gauges[s.name] = s.value
                    continue
                sample = versions.setdefault(version, VersionSample())
                if s.name in _FIELDS:
                    setattr(sample, _FIELDS[s.name], getattr(sample, _FIELDS[s.name]) + s.value)
                elif s.name in _HISTOGRAMS:
                    buckets = getattr(sample, _HISTOGRAMS[s.name])
                    bound = float(s.labels["le"])
                    buckets[bound] = buckets.get(bound, 0) + s.value
                elif s.name.startswith(SHADOW_PREFIX) and not s.name.endswith("_created"):
                    sample.shadow[s.name] = sample.shadow.get(s.name, 0) + s.value
    return versions, gauges


def server_count(texts: list[str]) -> int:
    """How many servers the pages are from: one a page, or each replica of a Ray application's page."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(len({s.labels[REPLICA_LABEL] for family in text_string_to_metric_families(text)
                    for s in family.samples if REPLICA_LABEL in s.labels}) or 1 for text in texts)


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """Prometheus's histogram_quantile over cumulative `buckets`; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower          # in the open top bucket: its lower edge, as Prometheus does
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


def quantile_interval(buckets: dict[float, float], q: float) -> tuple[float, float] | None:
    """A 95 % interval of the `q` quantile: the normal approximation of the order statistics' ranks
    (n q +- 1.96 sqrt(n q (1 - q))), each read off the histogram as `quantile` reads the point."""
    n = observations(buckets)
    if n <= 0:
        return None
    half = Z95 * math.sqrt(n * q * (1 - q))
    return quantile(buckets, max(0.0, n * q - half) / n), quantile(buckets, min(n, n * q + half) / n)


def observations(buckets: dict[float, float]) -> float:
    return buckets.get(math.inf, 0.0)


@dataclass(frozen=True, slots=True)
class Mean:
    n: float
    mean: float
    variance: float     # of one rating (n - 1 in the denominator)

    @classmethod
    def of(cls, sample: VersionSample) -> "Mean":
        n = sample.ratings
        if n <= 0:
            return cls(0, math.nan, math.nan)
        mean = sample.score_sum / n
        variance = max(0.0, sample.score_squares - n * mean * mean) / (n - 1) if n > 1 else math.nan
        return cls(n, mean, variance)

    def interval(self) -> tuple[float, float]:
        half = Z95 * math.sqrt(self.variance / self.n) if self.n > 1 else math.nan
        return self.mean - half, self.mean + half


def lower_mean_p(live: Mean, canary: Mean) -> float:
    """One-sided p of "the canary's mean feedback is lower than the live one's" (Welch's z)."""
    se = math.sqrt(live.variance / live.n + canary.variance / canary.n)
    if se == 0:
        return 0.0 if canary.mean < live.mean else 1.0
    return 0.5 * math.erfc((live.mean - canary.mean) / se / math.sqrt(2))


@dataclass(frozen=True, slots=True)
class CanaryLimits:
    """When a server aborts a canary (live.json's canary entry, "limits"); None: that limit is off."""
    error_rate: float | None = None      # abort when the canary's error rate is above live's plus this (0-1)
    tpot_pct: float | None = None        # ... when its p95 TPOT is more than this percent above live's
    feedback_min_n: int | None = None    # ... when its mean feedback is lower, p < 0.05, over this many ratings

    def __post_init__(self) -> None:
        if self.error_rate is not None and not 0 <= self.error_rate < 1:
            raise ValueError(f"--abort-error-rate {self.error_rate!r}: a fraction from 0 to 1 (0.05: five points "
                             f"above the live version's error rate)")
        if self.tpot_pct is not None and not 0 < self.tpot_pct <= 1000:
            raise ValueError(f"--abort-tpot-pct {self.tpot_pct!r}: a percent above 0 (20: p95 TPOT 20 % above live)")
        n = self.feedback_min_n
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < MIN_FEEDBACK_N):
            raise ValueError(f"--abort-feedback-min-n {self.feedback_min_n!r}: at least {MIN_FEEDBACK_N} ratings a "
                             f"side (the test is a normal approximation)")

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.error_rate, self.tpot_pct, self.feedback_min_n))

    def tripped(self, live: VersionSample, canary: VersionSample) -> str | None:
        """Why the canary must end, with the numbers; None while every limit holds."""
        if self.error_rate is not None and canary.requests > 0:
            live_rate = live.errors / live.requests if live.requests else 0.0
            low = wilson(canary.errors, canary.requests)[0]
            if low > live_rate + self.error_rate:
                return (f"error rate {canary.errors:.0f}/{canary.requests:.0f} (95% interval from {low:.3f}) above "
                        f"live {live_rate:.3f} ({live.errors:.0f}/{live.requests:.0f}) + {self.error_rate:g}")
        if self.tpot_pct is not None and min(observations(live.tpot), observations(canary.tpot)) >= MIN_TPOT_N:
            ours, theirs = quantile(canary.tpot, 0.95), quantile(live.tpot, 0.95)
            if ours > theirs * (1 + self.tpot_pct / 100):
                return f"p95 TPOT {ours * 1000:.1f} ms, more than {self.tpot_pct:g}% above live {theirs * 1000:.1f} ms"
        if self.feedback_min_n is not None and min(live.ratings, canary.ratings) >= self.feedback_min_n:
            ours, theirs = Mean.of(canary), Mean.of(live)
            p = lower_mean_p(theirs, ours)
            if p < ABORT_P:
                return (f"mean feedback {ours.mean:.3f} over {ours.n:.0f} ratings, lower than live {theirs.mean:.3f} "
                        f"over {theirs.n:.0f} (Welch z, one-sided p = {p:.4f} < {ABORT_P})")
        return None
