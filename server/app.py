"""Assembles the server from a ServerConfig: model, cache, adapters, engine, gRPC, HTTP and metrics."""
from __future__ import annotations

import logging
import time
from concurrent import futures
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from adapters.formats.adapter_dir import BaseShape
from adapters.formats.base_checkpoint import resolve_base
from cartridge.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from .adapter_registry import AdapterRegistry
from .adapter_slots import AdapterSlots
from .config import ServerConfig
from .cuda_graphs import DecodeGraphs
from .engine import Engine
from .errors import StatusInterceptor
from .generate_request import RequestValidator
from .http_edge import EngineBackend, HttpServer, openai_app
from .kv_cache import KVCache
from .metrics import ServerMetrics
from .runner import ModelRunner
from .scheduler import Scheduler
from .service import AdaptersService, InferenceService
from .weights import base_weight_bytes, load_model

log = logging.getLogger("cartridge")


@dataclass
class ServingCore:
    """One engine with its adapters, before any edge: what each front door (and each Ray replica) wraps."""
    engine: Engine
    registry: AdapterRegistry
    validator: RequestValidator
    metrics: ServerMetrics
    base_name: str


@dataclass
class RunningServer:
    grpc_server: grpc.Server
    engine: Engine
    port: int
    metrics_port: int
    http: HttpServer | None = None

    def stop(self, grace: float | None = 5.0) -> None:
        self.engine.draining = True
        self.grpc_server.stop(grace).wait()
        if self.http is not None:
            self.http.stop()
        self.engine.stop()


def eos_ids(directory, tokenizer) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    try:
        configured = GenerationConfig.from_pretrained(directory).eos_token_id
    except OSError:
        configured = None
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return frozenset(ids)


def build_core(config: ServerConfig) -> ServingCore:
    started = time.monotonic()
    device = torch.device(config.device)
    directory = resolve_base(config.base_model)
    model_config = AutoConfig.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    max_seq_len = min(config.max_seq_len, model_config.max_position_embeddings)
    model, stacks = load_model(directory, model_config, config.torch_dtype, device, config.quantize,
                               config.max_adapters + 1, config.max_lora_rank)
    cache = KVCache(model.args.n_layers, config.max_batch_size, max_seq_len, model.args.n_kv_heads,
                    model.args.head_dim, config.torch_dtype, device)
    adapter_slots = AdapterSlots(stacks, config.max_adapters)
    registry = AdapterRegistry(BaseShape.from_config(model_config), config.max_lora_rank)
    for name, path in config.adapters:
        registry.register(name, path)
    metrics = ServerMetrics(device, config.max_adapters)
    for part, size in (("base_weights", base_weight_bytes(model)), ("kv_cache", cache.size_bytes),
                       ("lora_slots", sum(stack.size_bytes for stack in stacks.values()))):
        metrics.device_memory.labels(part).set(size)
    scheduler = Scheduler(config.max_batch_size, config.max_queue, config.max_prefill_tokens, adapter_slots)
    graphs = DecodeGraphs(model, cache, config.max_lora_rank, device) if config.on_cuda and config.cuda_graphs else None
    runner = ModelRunner(model, cache, adapter_slots, device, graphs)
    engine = Engine(runner, scheduler, eos_ids(directory, tokenizer), metrics)
    engine.start()
    log.info("base %s on %s (%s, %s): weights+cache ready in %.1f s; KV cache %.0f MiB for %d x %d tokens",
             directory.name, device, "nf4" if config.quantize else "dense", str(config.torch_dtype).split(".")[-1],
             time.monotonic() - started, cache.size_bytes / 2**20, config.max_batch_size, max_seq_len)
    return ServingCore(engine, registry, RequestValidator(registry, tokenizer, max_seq_len), metrics, directory.name)


def build_server(config: ServerConfig) -> RunningServer:
    core = build_core(config)
    # Threads beyond the batch serve queued and streaming calls; past the limit gRPC itself
    # answers RESOURCE_EXHAUSTED.
    workers = config.max_batch_size + config.max_queue + 8
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[StatusInterceptor()],
                         maximum_concurrent_rpcs=workers)
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(core.engine, core.validator), server)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersService(core.registry), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
             adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name]
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    server.start()
    metrics_port = core.metrics.serve(config.host, config.metrics_port)
    http = None
    if config.http_port is not None:
        backend = EngineBackend(core.engine, core.validator, core.registry, core.base_name)
        http = HttpServer(openai_app(backend, core.metrics.registry), config.host, config.http_port)
        http.start()
    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server, core.engine, port, metrics_port, http)
