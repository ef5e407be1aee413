"""Assembles the server from a ServerConfig: model, cache, adapters, engine, gRPC, HTTP and metrics."""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from adapters.formats.adapter_dir import BaseShape
from adapters.formats.base_checkpoint import resolve_base
from adapters.formats.base_fingerprint import base_fingerprint
from adapters.formats.store_layout import StoreReader
from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from .lora.files import AdapterFilePolicy
from .lora.registry import AdapterRegistry
from .lora.slots import AdapterSlots
from .config import ServerConfig
from .engine.cuda_graphs import DecodeGraphs
from .engine.engine import Engine
from .errors import StatusInterceptor, Unavailable
from .edge.call_gate import CallGate
from .edge.adapter_defaults import request_defaults
from .edge.generate_request import MAX_REQUEST_BYTES, RequestValidator
from .engine.grammar import Grammars
from .edge.http_app import EngineBackend, HttpServer, openai_app
from .model.kv_cache import PagedKVCache
from .model.llama import ModelArgs
from .lora.batch import SlotWeights
from .engine.metrics import ServerMetrics
from .engine.block_pool import BlockPool
from .engine.runner import ModelRunner
from .engine.scheduler import Scheduler
from .edge.grpc_service import AdaptersService, InferenceService
from .engine.store_follower import StoreAdapters
from .model.weights import base_weight_bytes, load_model

log = logging.getLogger("cartridge")


@dataclass(frozen=True, slots=True)
class DrainReport:
    seconds: float
    in_flight: int    # calls running when the drain began
    cut_off: int      # of those and later queued ones, still running at the timeout


@dataclass
class ServingCore:
    """One engine with its adapters, before any edge: what each front door (and each Ray replica) wraps."""
    engine: Engine
    registry: AdapterRegistry
    validator: RequestValidator
    metrics: ServerMetrics
    gate: CallGate
    base_name: str
    store: StoreAdapters | None      # serve --store: versions (name@vN) and live releases


@dataclass
class RunningServer:
    grpc_server: grpc.Server
    engine: Engine
    gate: CallGate
    health: health.HealthServicer
    port: int
    metrics_port: int
    http: HttpServer | None = None

    def drain(self, timeout: float, hurried: Callable[[], bool] = lambda: False) -> DrainReport:
        """Graceful stop: NOT_SERVING and UNAVAILABLE for new calls at once, running calls get up to
        `timeout` s (or until `hurried()`), then whatever still runs ends with UNAVAILABLE."""
        started = time.monotonic()
        self.health.enter_graceful_shutdown()
        self.gate.begin_drain()
        in_flight = self.gate.in_flight
        deadline = started + timeout
        while not (finished := self.gate.wait_idle(0.05)):
            if time.monotonic() >= deadline or hurried():
                break
        cut_off = 0 if finished else self.gate.in_flight
        if not finished:
            self.engine.abort_all(Unavailable(
                f"the server shut down before this request finished: it waited {time.monotonic() - started:.1f} s "
                f"(--drain-timeout {timeout:g}) after SIGTERM; retry on another instance"))
            self.gate.wait_idle(5.0)   # the ended calls send their status
        seconds = time.monotonic() - started
        self.grpc_server.stop(1.0).wait()
        if self.http is not None:
            self.http.stop()
        self.engine.stop()
        return DrainReport(seconds, in_flight, cut_off)


class HealthService(health.HealthServicer):
    """grpc_health's servicer, whose NOT_FOUND for a service name it does not know says so (its own is silent)."""

    def Check(self, request, context):
        answer = super().Check(request, context)
        if context.code() == grpc.StatusCode.NOT_FOUND:
            context.set_details(f"no health status for service {request.service!r}; ask for '' (the whole server) "
                                f"or one of its services")
        return answer


def eos_ids(directory, tokenizer) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        configured = GenerationConfig.from_pretrained(directory).eos_token_id
    except OSError:
        configured = None
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return frozenset(ids)


def paged_kv_cache(config: ServerConfig, args: ModelArgs, max_seq_len: int, device: torch.device) -> PagedKVCache:
    """The block pool --kv-cache-memory holds (bytes, or a share of the memory free now, after the weights);
    it must hold one request of --max-seq-len, besides the scratch block."""
    per_block = PagedKVCache.bytes_per_block(args.n_layers, config.kv_block_size, args.n_kv_heads, args.head_dim,
                                             config.torch_dtype)
    memory = config.kv_cache_bytes(per_block // config.kv_block_size)
    if memory <= 1:
        memory *= torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    num_blocks, needed = int(memory // per_block), -(-max_seq_len // config.kv_block_size) + 1
    if num_blocks < needed:
        raise ValueError(f"--kv-cache-memory: {memory / 2**20:.0f} MiB holds {num_blocks} blocks of "
                         f"{config.kv_block_size} tokens ({per_block / 2**20:.2f} MiB each), less than one request "
                         f"of --max-seq-len {max_seq_len} needs ({needed}); give more, or a shorter --max-seq-len")
    return PagedKVCache(args.n_layers, num_blocks, config.kv_block_size, args.n_kv_heads, args.head_dim,
                        config.torch_dtype, device)


def build_core(config: ServerConfig, *, store_on_demand: bool = False) -> ServingCore:
    """`store_on_demand`: follow only the store names asked for (a Ray replica), not every one from the start."""
    started = time.monotonic()
    device = torch.device(config.device)
    directory = resolve_base(config.base_model)
    model_config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    max_seq_len = min(config.max_seq_len, model_config.max_position_embeddings)
    model, stacks = load_model(directory, model_config, config.torch_dtype, device, config.quantize,
                               config.max_adapters + 1, config.max_lora_rank, kernels=config.kernels,
                               nf4_kernel_max_rows=config.nf4_kernel_max_rows)
    cache = paged_kv_cache(config, model.args, max_seq_len, device)
    adapter_slots = AdapterSlots(stacks, config.max_adapters)
    stop_ids = eos_ids(directory, tokenizer)
    # Structured output: xgrammar over this tokenizer, its vocabulary as wide as the model's logits. Made
    # before any adapter is read: an adapter's cartridge.json may name a format, compiled when it registers.
    grammars = Grammars(tokenizer, model.args.vocab_size, stop_ids)
    registry = AdapterRegistry(BaseShape.from_config(model_config), config.max_lora_rank,
                               AdapterFilePolicy(config.adapter_root, config.max_adapter_bytes),
                               config.max_adapters, config.max_host_adapter_bytes,
                               base_fingerprint=functools.cache(lambda: base_fingerprint(directory)),
                               stage=functools.partial(SlotWeights.stage, dtype=config.torch_dtype,
                                                       pin=device.type == "cuda"),
                               check_defaults=functools.partial(request_defaults, grammars=grammars,
                                                                vocab_size=model.args.vocab_size))
    for name, path in config.adapters:
        registry.register(name, path)
    metrics = ServerMetrics(device, config.max_adapters)
    for part, size in (("base_weights", base_weight_bytes(model)), ("kv_cache", cache.size_bytes),
                       ("lora_slots", sum(stack.size_bytes for stack in stacks.values()))):
        metrics.device_memory.labels(part).set(size)
    pool = BlockPool(cache.num_blocks, cache.block_size, config.prefix_cache)
    scheduler = Scheduler(pool, config.max_batch_size, config.tokens_per_pass, config.max_queue, adapter_slots)
    graphs = None
    if config.on_cuda and config.cuda_graphs:
        graphs = DecodeGraphs(model, cache, config.max_batch_size, -(-max_seq_len // cache.block_size),
                              config.max_lora_rank, device)
    if graphs is not None:
        captured = time.monotonic()
        count = graphs.capture_all()
        log.info("captured %d decode graphs in %.1f s", count, time.monotonic() - captured)
    runner = ModelRunner(model, cache, adapter_slots, device, graphs, config.max_batch_size)
    engine = Engine(runner, scheduler, stop_ids, metrics, registry)
    engine.start()
    store = None
    if config.store is not None:
        store = StoreAdapters(StoreReader(Path(config.store).resolve()), registry, engine, metrics,
                              on_demand=store_on_demand, canary_check_s=config.canary_check_s)
        store.start()
    log.info("base %s on %s (%s, %s): weights+cache ready in %.1f s; KV cache %.0f MiB: %d blocks of %d tokens",
             directory.name, device, "nf4" if config.quantize else "dense", str(config.torch_dtype).split(".")[-1],
             time.monotonic() - started, cache.size_bytes / 2**20, pool.num_usable, cache.block_size)
    return ServingCore(engine, registry, RequestValidator(registry, tokenizer, max_seq_len, store, grammars,
                                                        model.args.vocab_size), metrics,
                       CallGate(config.admin_token, config.inference_token), directory.name, store)


def build_server(config: ServerConfig) -> RunningServer:
    core = build_core(config)
    # Threads beyond the batch serve queued and streaming calls; past the limit gRPC itself
    # answers RESOURCE_EXHAUSTED.
    workers = config.max_batch_size + config.max_queue + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[core.gate, StatusInterceptor()],
                         maximum_concurrent_rpcs=workers,
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    inference = InferenceService(core.engine, core.validator, core.metrics.feedback)
    inference_pb2_grpc.add_InferenceServicer_to_server(inference, server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersService(core.registry, core.engine, core.store), server)
    health_servicer = HealthService()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    if config.tls_cert:
        key_pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
        port = server.add_secure_port(address, grpc.ssl_server_credentials([key_pair]))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    server.start()
    metrics_port = core.metrics.serve(config.host, config.metrics_port)
    http = None
    if config.http_port is not None:
        backend = EngineBackend(core.engine, core.validator, core.registry, core.gate, core.base_name)
        http = HttpServer(openai_app(backend, core.metrics.registry), config.host, config.http_port,
                          config.tls_cert, config.tls_key)
        http.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, core.engine, core.gate, health_servicer, port, metrics_port, http)
