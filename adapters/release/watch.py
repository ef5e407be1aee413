"""`cartridge canary NAME --url URL...`: the live version against its canary or shadow, from the Prometheus
metrics of one server or of several summed (every replica behind a load balancer, or the one page of a
`serve-ray` application, where every engine replica's series carry their replica's label), with 95 % intervals.

It reads only /metrics, never logs, and computes each figure with adapters/formats/version_stats.py, the
code a server judges its canary's abort limits with.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

from ..formats.version_stats import (Mean, VersionSample, lower_mean_p, observations, quantile, quantile_interval,
                                     read_samples, server_count, wilson)

EXIT_UNREACHABLE = 1


def register(commands) -> None:
    p = commands.add_parser("canary", help="compare a name's live version with its canary or shadow",
                            description="Requests, error rate, TTFT and TPOT p50/p95, mean feedback and shadow "
                            "agreement of NAME's live version and its canary or shadow, each with a 95% interval, "
                            "from the metrics of the servers given (summed).")
    p.add_argument("name")
    p.add_argument("--url", action="append", required=True, metavar="URL",
                   help="a server's metrics endpoint, e.g. http://127.0.0.1:9464/metrics (repeat for every replica; "
                   "serve-ray's HTTP port serves every replica's at /metrics)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    texts = []
    for url in args.url:
        url = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as reply:
                texts.append(reply.read().decode())
        except (urllib.error.URLError, OSError, ValueError) as err:
            print(f"cartridge canary: cannot read {url}: {getattr(err, 'reason', err)}", file=sys.stderr)
            return EXIT_UNREACHABLE
    print("\n".join(report(args.name, texts)))
    return 0


def report(name: str, texts: list[str]) -> list[str]:
    samples, gauges = read_samples(texts, name)
    live = gauges.get("cartridge_live_version")
    if live is None:
        return [f"{name}: no server given serves a live version of it (serve --store)"]
    columns = [("live", int(live))]
    for role in ("canary", "shadow"):
        if f"cartridge_{role}_version" in gauges:
            columns.append((f"{role} {gauges[f'cartridge_{role}_share_percent']:g}%",
                            int(gauges[f"cartridge_{role}_version"])))
    count = server_count(texts)
    servers = f"{count} server{'s' if count > 1 else ''}"
    if len(columns) == 1:
        return [f"{name}: live v{int(live)}, no canary or shadow running ({servers})"]
    rows = {label: samples.get(f"v{version}", VersionSample()) for label, version in columns}
    head = f"{name}: " + " against ".join(f"{label} v{version}" for label, version in columns) + f" ({servers}, " \
        "95% intervals)"
    table = [("", [f"{label} v{version}" for label, version in columns])]
    total = sum(s.requests for s in rows.values())
    table.append(("requests", [f"{s.requests:.0f} ({_pct(*wilson(s.requests, total), s.requests / (total or 1))})"
                               for s in rows.values()]))
    table.append(("error rate", [f"{_pct(*wilson(s.errors, s.requests), s.errors / s.requests if s.requests else 0)}"
                                 for s in rows.values()]))
    for metric in ("ttft", "tpot"):
        for q in (0.5, 0.95):
            cells = [_latency(getattr(s, metric), q) for s in rows.values()]
            table.append((f"{metric.upper()} p{round(q * 100)}", cells))
    live_mean = Mean.of(rows["live"])
    cells = []
    for label, sample in rows.items():
        mean = Mean.of(sample)
        cell = "no ratings" if mean.n == 0 else f"{mean.mean:+.3f} [{mean.interval()[0]:+.3f}, " \
               f"{mean.interval()[1]:+.3f}] n={mean.n:.0f}"
        if label != "live" and mean.n > 1 and live_mean.n > 1:
            cell += f", lower than live: p = {lower_mean_p(live_mean, mean):.4f}"
        cells.append(cell)
    table.append(("feedback (-1..1)", cells))
    shadow = [s for label, s in rows.items() if label.startswith("shadow")]
    if shadow:
        table.append(("shadow agreement", ["", *[_agreement(s) for s in rows.values()][1:]]))
    width = [max(len(r[0]) for r in table), *[max(len(r[1][i]) for r in table) for i in range(len(columns))]]
    lines = [head]
    for label, cells in table:
        lines.append("  ".join([label.ljust(width[0]), *[c.ljust(w) for c, w in zip(cells, width[1:])]]).rstrip())
    return lines


def _pct(low: float, high: float, point: float) -> str:
    return f"{point:.1%} [{low:.1%}, {high:.1%}]"


def _latency(buckets: dict[float, float], q: float) -> str:
    point, interval = quantile(buckets, q), quantile_interval(buckets, q)
    if point is None:
        return "no requests"
    return f"{point * 1000:.0f} ms [{interval[0] * 1000:.0f}, {interval[1] * 1000:.0f}] n={observations(buckets):.0f}"


def _agreement(sample: VersionSample) -> str:
    s = sample.shadow
    judged = s.get("cartridge_shadow_greedy_pairs_total", 0)
    if not s.get("cartridge_shadow_pairs_total"):
        return "no pairs yet"
    exact = s.get("cartridge_shadow_exact_total", 0)
    text = f"{s['cartridge_shadow_pairs_total']:.0f} pairs, {s.get('cartridge_shadow_shed_total', 0):.0f} shed"
    if judged:
        distance = s.get("cartridge_shadow_edit_distance_sum", 0) / judged
        text += f"; greedy exact {_pct(*wilson(exact, judged), exact / judged)}, mean edit distance {distance:.3f}"
    return text
