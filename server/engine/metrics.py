"""Prometheus metrics, served as text on their own HTTP port."""
from __future__ import annotations

import os
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from urllib.parse import urlsplit

import psutil
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, MetricsHandler
from prometheus_client.core import GaugeMetricFamily

from .feedback import FeedbackBook
from .scheduler import Plan, Scheduler
from .shadow import ShadowMetrics
from .sequence import Sequence
from .version_metrics import LATENCY_BUCKETS as _LATENCY_BUCKETS, TOKEN_BUCKETS as _TOKEN_BUCKETS, VersionMetrics


class _MemoryCollector:
    """Reads memory at scrape time, so the figure is never stale."""

    def __init__(self, device: torch.device):
        self._device = device

    def collect(self):
        if self._device.type == "cuda":
            allocated = GaugeMetricFamily("cartridge_vram_allocated_bytes",
                                          "GPU memory held by tensors (torch.cuda.memory_allocated)")
            reserved = GaugeMetricFamily("cartridge_vram_reserved_bytes",
                                         "GPU memory reserved by the caching allocator (torch.cuda.memory_reserved)")
            allocated.add_metric([], torch.cuda.memory_allocated(self._device))
            reserved.add_metric([], torch.cuda.memory_reserved(self._device))
        else:
            rss = psutil.Process(os.getpid()).memory_info().rss
            allocated = GaugeMetricFamily("cartridge_vram_allocated_bytes",
                                          "No GPU on this host: resident memory (RSS) of the server process instead")
            reserved = GaugeMetricFamily("cartridge_vram_reserved_bytes",
                                         "No GPU on this host: resident memory (RSS) of the server process instead")
            allocated.add_metric([], rss)
            reserved.add_metric([], rss)
        yield allocated
        yield reserved


class _LoraInfoCollector:
    """vLLM's lora_requests_info under our name: the adapters of running and waiting requests and the
    device slot limit, as labels (what the Gateway API Inference Extension's endpoint picker reads).
    The value is when the engine last looked, as vLLM's is."""

    def __init__(self, max_lora: int):
        self.max_lora = str(max_lora)
        self.snapshot: tuple[float, str, str] = (time.time(), "", "")   # replaced whole by the engine thread

    def collect(self):
        at, running, waiting = self.snapshot
        info = GaugeMetricFamily("cartridge_lora_requests_info", "Adapters of running and waiting requests "
                                 "(comma-separated) and the adapters a device holds at once",
                                 labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        info.add_metric([running, waiting, self.max_lora], at)
        yield info


class _MetricsOnly(MetricsHandler):
    """Prometheus text at /metrics, 404 on every other path (the stock handler answers any path)."""

    def do_GET(self) -> None:
        if urlsplit(self.path).path != "/metrics":
            self.send_error(404, "only /metrics is served on this port")
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass   # one line per scrape would drown the server's log


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class ServerMetrics:
    def __init__(self, device: torch.device, max_lora: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram("cartridge_request_latency_seconds", "Arrival to last token of a request",
                                 ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("cartridge_time_to_first_token_seconds", "Arrival to first generated token",
                              ["adapter"], buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("cartridge_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per request",
                              ["adapter"], buckets=_TOKEN_BUCKETS, registry=r)
        self.requests = Counter("cartridge_requests", "Finished requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("cartridge_prompt_tokens", "Prompt tokens processed", ["adapter"], registry=r)
        self.generated_tokens = Counter("cartridge_generated_tokens", "Tokens generated", ["adapter"], registry=r)
        self.running = Gauge("cartridge_requests_running", "Requests decoding now", registry=r)
        self.waiting = Gauge("cartridge_requests_waiting", "Requests queued for a slot", registry=r)
        self.decode_batch = Histogram("cartridge_decode_batch_size", "Requests advanced together by one forward pass",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.host_gap = Histogram("cartridge_engine_host_gap_seconds",
                                  "From one pass's tokens reaching the host to the next pass's launch, while work "
                                  "waits: host time the device is not busy", registry=r,
                                  buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1))
        self.adapters_resident = Gauge("cartridge_adapters_resident", "Adapters loaded in device slots", registry=r)
        self.kv_cache_usage = Gauge("cartridge_kv_cache_usage_ratio",
                                    "Share of KV-cache blocks held by running requests (0 to 1); free cached "
                                    "blocks count as free", registry=r)
        self.kv_blocks_in_use = Gauge("cartridge_kv_cache_blocks_in_use", "KV-cache blocks held by running requests",
                                      registry=r)
        self.prefix_cached_blocks = Gauge("cartridge_prefix_cache_blocks", "Full KV-cache blocks findable by their "
                                          "prefix (held or free)", registry=r)
        self.prefix_hit_tokens = Counter("cartridge_prefix_cache_hit_tokens", "Tokens of admitted requests found in "
                                         "the prefix cache, not computed", registry=r)
        self.prefix_query_tokens = Counter("cartridge_prefix_cache_query_tokens", "Tokens of admitted requests "
                                           "looked up in the prefix cache (hit ratio: hit / query)", registry=r)
        self.preemptions = Counter("cartridge_preemptions", "Requests preempted for lack of KV-cache blocks, to be "
                                   "computed again", registry=r)
        self.device_memory = Gauge("cartridge_device_memory_bytes", "Device memory reserved at start, by part: "
                                   "base_weights, lora_slots (every adapter slot), kv_cache", ["part"], registry=r)
        self._lora_info = _LoraInfoCollector(max_lora)
        # The adapter store (serve --store): versions served live or asked for as name@vN only, so labels stay bounded.
        self.version_requests = Counter("cartridge_version_requests", "Finished requests per stored adapter version",
                                        ["adapter", "version"], registry=r)
        self.live_version = Gauge("cartridge_live_version", "Store version served as the adapter's live version",
                                  ["adapter"], registry=r)
        self.releases = Counter("cartridge_releases", "Releases seen in the store's log", ["adapter"], registry=r)
        self.rollbacks = Counter("cartridge_rollbacks", "Rollbacks seen in the store's log", ["adapter"], registry=r)
        self.canary_version = Gauge("cartridge_canary_version", "Store version in a canary beside the live one "
                                    "(release --canary); no series when none runs", ["adapter"], registry=r)
        self.canary_share = Gauge("cartridge_canary_share_percent", "Share of the adapter's requests its canary "
                                  "version is sent", ["adapter"], registry=r)
        self.shadow_version = Gauge("cartridge_shadow_version", "Store version shadowing the live one (release "
                                    "--shadow): it runs a share of requests beside it, unseen by callers",
                                    ["adapter"], registry=r)
        self.shadow_share = Gauge("cartridge_shadow_share_percent", "Share of the adapter's requests its shadow "
                                  "version also runs", ["adapter"], registry=r)
        self.versions = VersionMetrics(r)
        self.shadows = ShadowMetrics(r)
        self.feedback = FeedbackBook(self.versions)
        self.store_load_failures = Counter("cartridge_store_load_failures", "Live versions that failed to load "
                                           "(the previous one kept serving)", ["adapter"], registry=r)
        r.register(_MemoryCollector(device))
        r.register(self._lora_info)
        self._per_adapter = (self.latency, self.ttft, self.tpot, self.requests, self.prompt_tokens,
                             self.generated_tokens)

    def serve(self, host: str, port: int) -> int:
        """Starts the HTTP endpoint; returns the bound port (useful with port 0)."""
        handler = type("Handler", (_MetricsOnly,), {"registry": self.registry})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = type("HTTPServer", (_HTTPServer,), {"address_family": family})((host, port), handler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        return server.server_port

    def observe_schedule(self, scheduler: Scheduler) -> None:
        """Called by the engine after every step."""
        self.running.set(len(scheduler.running))
        self.waiting.set(scheduler.num_waiting)
        pool = scheduler.pool
        self.kv_cache_usage.set(pool.num_in_use / pool.num_usable)
        self.kv_blocks_in_use.set(pool.num_in_use)
        self.prefix_cached_blocks.set(pool.num_cached)
        self.adapters_resident.set(scheduler.adapter_slots.num_resident)
        running, waiting = scheduler.adapter_names()
        if (running, waiting) != self._lora_info.snapshot[1:]:
            self._lora_info.snapshot = (time.time(), running, waiting)

    def observe_plan(self, plan: Plan) -> None:
        self.preemptions.inc(len(plan.preempted))
        self.prefix_hit_tokens.inc(plan.cached_tokens)
        self.prefix_query_tokens.inc(plan.looked_up_tokens)

    def forget_adapter(self, name: str) -> None:
        """Removes every series labelled with an unregistered adapter, so labels stay bounded."""
        for metric in self._per_adapter:
            metric.remove_by_labels({"adapter": name})

    def forget_version(self, name: str, version: int) -> None:
        """Removes a store version's series once it is neither live nor asked for by number."""
        self.version_requests.remove_by_labels({"adapter": name, "version": f"v{version}"})
        self.versions.forget(name, version)
        self.shadows.forget(name, version)

    def forget_canary(self, name: str) -> None:
        self._forget_gauges(name, self.canary_version, self.canary_share)

    def forget_shadow(self, name: str) -> None:
        self._forget_gauges(name, self.shadow_version, self.shadow_share)

    @staticmethod
    def _forget_gauges(name: str, *gauges: Gauge) -> None:
        for gauge in gauges:
            try:
                gauge.remove(name)
            except KeyError:
                pass

    def refused(self, seq: Sequence) -> None:
        """A request whose adapter version could not be held (its weights unreadable): the version's error."""
        self.versions.finished(seq, time.monotonic(), failed=True)

    def finished(self, seq: Sequence, failed: bool = False) -> None:
        """`failed`: the server ended the request with an error."""
        now, adapter = time.monotonic(), seq.adapter_name
        label = self.versions.finished(seq, now, failed)
        answered = not failed and not seq.cancelled
        if seq.pair is not None:
            self.shadows.ended(seq, now, answered)
        if seq.shadow:
            return    # no caller's request: counted by version and in its pair alone
        if label is not None and answered:
            self.feedback.answered(seq.request_id, seq.adapter.store_name, seq.adapter.version, label)
        if seq.adapter is not None and seq.adapter.version is not None:
            self.version_requests.labels(seq.adapter.store_name, f"v{seq.adapter.version}").inc()
        self.latency.labels(adapter).observe(now - seq.arrival_time)
        self.requests.labels(adapter, seq.finish_reason.value).inc()
        if seq.index == 0:    # a request's other choices (n > 1) share choice 0's prefill
            self.prompt_tokens.labels(adapter).inc(len(seq.prompt_ids))
        self.generated_tokens.labels(adapter).inc(len(seq.output_ids))
        if seq.first_token_time is not None:
            self.ttft.labels(adapter).observe(seq.first_token_time - seq.arrival_time)
            if len(seq.output_ids) > 1:
                self.tpot.labels(adapter).observe((now - seq.first_token_time) / (len(seq.output_ids) - 1))
