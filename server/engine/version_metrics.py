"""What a release decision needs, per stored adapter version: requests, errors, TTFT, TPOT and feedback,
labelled by the name and the version that the store's split sent each request to.

Only the versions a release routes to get a label of their own: the live one, the canary and the shadow.
A request that pins `name@vN` is counted under version "other", so a name holds a handful of series
however many versions callers pin; a version's series go when it is neither served nor in use
(ServerMetrics.forget_version). Feedback is kept as count, sum and sum of squares, which is what a mean,
its interval and a two-sample test need (adapters/formats/version_stats.py), summed over servers.
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .sequence import Sequence

OTHER = "other"          # the version label of requests that named their version themselves
MAX_TAGS = 16            # distinct feedback tags counted by name per version; the rest as OTHER
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


def version_label(seq: Sequence) -> str | None:
    """`vN` for a request the split sent to a live, canary or shadow version; OTHER for a pinned one; None
    for the base and adapters registered by path."""
    adapter = seq.adapter
    if adapter is None or adapter.version is None:
        return None
    return f"v{adapter.version}" if adapter.live or seq.canary or seq.shadow else OTHER


class VersionMetrics:
    def __init__(self, registry: CollectorRegistry):
        r, labels = registry, ["adapter", "version"]
        self.requests = Counter("cartridge_release_requests", "Requests that ended (answered or failed), by the "
                                "version the release split sent them to", labels, registry=r)
        self.errors = Counter("cartridge_release_errors", "Of those, requests the version failed: its weights could "
                              "not be read, or the pass running it failed", labels, registry=r)
        self.ttft = Histogram("cartridge_release_ttft_seconds", "Arrival to first token, by version", labels,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("cartridge_release_tpot_seconds", "Mean time between output tokens after the first, "
                              "by version", labels, buckets=TOKEN_BUCKETS, registry=r)
        self.ratings = Counter("cartridge_feedback_ratings", "Feedback scores received, by the version that answered",
                               labels, registry=r)
        # Gauges: scores may be negative, and a later rating of an answer replaces its earlier one.
        self.score_sum = Gauge("cartridge_feedback_score_sum", "Sum of feedback scores (-1 to 1)", labels, registry=r)
        self.score_squares = Gauge("cartridge_feedback_score_squares_sum", "Sum of squared feedback scores",
                                   labels, registry=r)
        self.tags = Counter("cartridge_feedback_tags", "Feedback by tag", [*labels, "tag"], registry=r)
        self._tags: dict[tuple[str, str], set[str]] = {}
        self._lock = threading.Lock()

    def finished(self, seq: Sequence, now: float, failed: bool) -> str | None:
        """Counts an ended request (not one its caller cancelled); returns its version label."""
        label = version_label(seq)
        if label is None or (seq.cancelled and not failed):
            return label
        name = seq.adapter.store_name
        self.requests.labels(name, label).inc()
        if failed:
            self.errors.labels(name, label).inc()
            return label
        if seq.first_token_time is not None:
            self.ttft.labels(name, label).observe(seq.first_token_time - seq.arrival_time)
            if len(seq.output_ids) > 1:
                self.tpot.labels(name, label).observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))
        return label

    def rated(self, name: str, label: str, score: float, tag: str, replaces: float | None = None) -> None:
        """Counts a rating; `replaces`: the same answer's earlier score, which this one takes the place of."""
        earlier = replaces or 0.0
        with self._lock:
            if replaces is None:
                self.ratings.labels(name, label).inc()
            self.score_sum.labels(name, label).inc(score - earlier)
            self.score_squares.labels(name, label).inc(score * score - earlier * earlier)
            if tag:
                seen = self._tags.setdefault((name, label), set())
                if tag not in seen and len(seen) < MAX_TAGS:
                    seen.add(tag)
                self.tags.labels(name, label, tag if tag in seen else OTHER).inc()

    def forget(self, name: str, version: int) -> None:
        label = {"adapter": name, "version": f"v{version}"}
        with self._lock:
            self._tags.pop((name, label["version"]), None)
            for metric in (self.requests, self.errors, self.ttft, self.tpot, self.ratings, self.score_sum,
                           self.score_squares, self.tags):
                metric.remove_by_labels(label)
