"""The statistics behind `cartridge canary` and the canary abort limits, against values worked out by hand or
by the textbook formula in float64."""
from __future__ import annotations

import math
import random

import pytest

from adapters.formats.version_stats import (CanaryLimits, Mean, VersionSample, lower_mean_p, quantile,
                                            quantile_interval, wilson)


def test_wilson_interval_matches_the_textbook_values():
    assert wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-5)       # 1.96^2 / (10 + 1.96^2)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)


def test_quantile_reads_a_histogram_as_prometheus_does():
    # 100 observations: 50 in (0, 0.01], 40 in (0.01, 0.02], 10 in (0.02, 0.04].
    buckets = {0.01: 50, 0.02: 90, 0.04: 100, math.inf: 100}
    assert quantile(buckets, 0.5) == pytest.approx(0.01)
    assert quantile(buckets, 0.95) == pytest.approx(0.03)      # halfway through the third bucket
    low, high = quantile_interval(buckets, 0.5)
    assert low < 0.01 < high and quantile({}, 0.5) is None


def test_welch_z_finds_a_planted_drop_and_not_an_equal_one():
    rng = random.Random(5)

    def sample(mean: float, n: int) -> VersionSample:
        scores = [max(-1.0, min(1.0, rng.gauss(mean, 0.4))) for _ in range(n)]
        return VersionSample(ratings=n, score_sum=sum(scores), score_squares=sum(s * s for s in scores))

    live = Mean.of(sample(0.5, 200))
    assert lower_mean_p(live, Mean.of(sample(0.1, 200))) < 1e-6
    equal = [lower_mean_p(Mean.of(sample(0.5, 200)), Mean.of(sample(0.5, 200))) for _ in range(200)]
    assert 0.01 < sum(p < 0.05 for p in equal) / 200 < 0.12       # about 5 % false alarms
    assert Mean.of(VersionSample(ratings=4, score_sum=2, score_squares=1.5)).variance == pytest.approx(1 / 6)


def test_limits_trip_with_the_numbers_and_only_past_their_minimum_counts():
    limits = CanaryLimits(error_rate=0.05, tpot_pct=20, feedback_min_n=30)
    healthy = VersionSample(requests=100, errors=1, tpot={0.01: 50, 0.02: 100, math.inf: 100})
    assert limits.tripped(healthy, VersionSample(requests=2, errors=0)) is None
    reason = limits.tripped(healthy, VersionSample(requests=4, errors=4))
    assert reason.startswith("error rate 4/4 (95% interval from 0.510) above live 0.010 (1/100) + 0.05")
    slow = VersionSample(requests=40, tpot={0.01: 0, 0.02: 10, 0.04: 40, math.inf: 40})   # 0.02 + 0.02 * 28/30
    assert "p95 TPOT 38.7 ms, more than 20% above live 19.0 ms" in limits.tripped(healthy, slow)
    few = VersionSample(requests=19, tpot={0.04: 19, math.inf: 19})
    assert limits.tripped(healthy, few) is None
