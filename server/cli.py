"""`cartridge serve`: flags -> ServerConfig -> a running server."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading


def register(commands) -> None:
    parser = commands.add_parser("serve", help="start the gRPC server", description=(
        "Serve one Llama-family base (NF4 on CUDA) with many LoRA adapters batched together."))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=50051, help="gRPC port, 0 picks a free one (default: %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=9464,
                        help="Prometheus HTTP port, 0 picks a free one (default: %(default)s)")
    parser.add_argument("--http-port", type=int, help="also serve the OpenAI-compatible HTTP API on this port, "
                        "0 picks a free one (default: off)")
    engine_flags(parser)
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="register an adapter at start-up (repeatable)")
    parser.set_defaults(run=run)


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one engine: `cartridge serve` and each replica of `cartridge serve-ray`."""
    parser.add_argument("--base-model", metavar="DIR", help="transformers-format Llama checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--quantization", choices=("nf4", "none"), help="default: nf4 on CUDA, none on CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="requests decoding at once (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="prompt + answer tokens (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED "
                        "(default: %(default)s)")
    parser.add_argument("--max-prefill-tokens", type=int, default=4096,
                        help="padded prompt tokens per prefill pass (default: %(default)s)")
    parser.add_argument("--max-adapters", type=int, default=16,
                        help="adapters resident on the device at once; more can be registered (default: %(default)s)")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run decode eagerly on CUDA (graphs are on by default there)")


def server_config(args: argparse.Namespace):
    """The ServerConfig of the flags in `args` that are ServerConfig's; other commands' flags stay out."""
    from dataclasses import fields

    from .config import ServerConfig

    adapters = []
    for item in getattr(args, "adapter", []):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=PATH")
        adapters.append((name, path))
    names = {f.name for f in fields(ServerConfig)} - {"adapters"}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    return ServerConfig(**given, adapters=tuple(adapters))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("cartridge")
    try:
        config = server_config(args)
        from .app import build_server

        server = build_server(config)
    except (ValueError, OSError) as err:
        print(f"cartridge serve: {err}", file=sys.stderr)
        return 2
    # The one line scripts and tests wait for; ports are the bound ones (0 picks free ports).
    http = f", OpenAI HTTP on http://{config.host}:{server.http.port}/v1" if server.http else ""
    print(f"cartridge: serving gRPC on {config.host}:{server.port}, metrics on "
          f"http://{config.host}:{server.metrics_port}/metrics{http}", flush=True)
    wait_for_stop_signal()
    log.info("shutting down: finishing running requests for up to 5 s")
    server.stop(5.0)
    return 0


def wait_for_stop_signal() -> None:
    """Blocks until SIGINT or SIGTERM."""
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
