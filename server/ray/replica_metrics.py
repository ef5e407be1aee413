"""One Prometheus page for all the engine replicas of a Ray application, served by the Ingress at /metrics.

Each replica's series keep their names and labels and gain `replica` (the id its answers name in
x-cartridge-replica), so series of two replicas never clash and a sum over `replica` is the whole
application: what `cartridge canary NAME --url http://HOST:8000/metrics` adds up.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from adapters.formats.version_stats import REPLICA_LABEL


class _Families:
    """A collector of families already made."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def merged_page(pages: dict[str, str]) -> bytes:
    """The Prometheus text of every replica's page (replica id -> its text), each series labelled by replica."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(pages.items()):
        for family in text_string_to_metric_families(text):
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            for sample in family.samples:
                into.add_sample(sample.name, {**sample.labels, REPLICA_LABEL: replica}, sample.value,
                                sample.timestamp, sample.exemplar)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)
