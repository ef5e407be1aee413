"""`cartridge serve`: flags -> ServerConfig -> a running server."""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from .stop_signals import StopSignals

ADMIN_TOKEN_ENV = "CARTRIDGE_ADMIN_TOKEN"
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


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
    safety = parser.add_argument_group("drain, access and limits")
    safety.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM/SIGINT, how long running requests may finish (default: %(default)s)")
    safety.add_argument("--admin-token-file", metavar="FILE", help="Register/UnregisterAdapter need this token "
                        f"as 'authorization: Bearer <token>' (default: ${ADMIN_TOKEN_ENV}; unset = open)")
    safety.add_argument("--inference-token-file", metavar="FILE",
                        help="inference calls need this token (or the admin one) (default: open)")
    safety.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate chain")
    safety.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    safety.add_argument("--adapter-root", metavar="DIR",
                        help="register only adapters whose path, symlinks followed, lies under DIR")
    safety.add_argument("--max-adapter-bytes", type=byte_count, default=2 << 30, metavar="BYTES",
                        help="largest adapter_model.safetensors accepted, e.g. 500MiB (default: 2GiB)")
    safety.add_argument("--max-host-adapter-bytes", type=byte_count, metavar="BYTES",
                        help="host memory for adapter weights; idle ones past it are dropped and read again "
                        "when used (default: no limit)")
    store_flag(parser)
    parser.add_argument("--canary-check-s", type=float, metavar="SECONDS",
                        help="with --store: how often a canary's abort limits (release --abort-...) are checked "
                        "against this server's metrics (default: 5)")
    parser.set_defaults(run=run)


def store_flag(parser) -> None:
    """--store: `cartridge serve` and `cartridge serve-ray` (a parser or a mutually exclusive group)."""
    parser.add_argument("--store", nargs="?", const="", metavar="DIR",
                        help="serve every live version of the adapter store DIR (alone: $CARTRIDGE_STORE or the "
                        "cache's store/) as NAME, any version as NAME@vN, and follow releases and rollbacks")


def engine_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of one engine: `cartridge serve` and each replica of `cartridge serve-ray`."""
    parser.add_argument("--base-model", metavar="DIR", help="transformers-format Llama checkpoint "
                        "(default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if present)")
    parser.add_argument("--quantization", choices=("nf4", "none"), help="default: nf4 on CUDA, none on CPU")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--max-batch-size", type=int, default=256,
                        help="requests (rows) in one forward pass (default: %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="prompt + answer tokens (default: %(default)s)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before RESOURCE_EXHAUSTED "
                        "(default: %(default)s)")
    parser.add_argument("--max-tokens-per-pass", type=int,
                        help="tokens of one forward pass: decode rows first, prompts in chunks in the rest "
                        "(default: 2048 on CUDA, 512 on CPU)")
    parser.add_argument("--kv-cache-memory", type=memory_amount, metavar="BYTES|SHARE",
                        help="KV-cache size, e.g. 20GiB, or a share of free device memory, e.g. 0.9 "
                        "(default: 0.9 on CUDA; on CPU room for 16 requests of --max-seq-len)")
    parser.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV-cache block (default: %(default)s)")
    parser.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                        help="compute every prompt whole, keeping no blocks for later requests")
    parser.add_argument("--max-adapters", type=int, default=16,
                        help="adapters resident on the device at once; more can be registered (default: %(default)s)")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="largest adapter rank (default: %(default)s)")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="run decode eagerly on CUDA (graphs are on by default there)")
    parser.add_argument("--no-triton-kernels", dest="triton_kernels", action="store_false",
                        help="on CUDA, use bitsandbytes and torch for NF4 and LoRA instead of our Triton kernels")
    parser.add_argument("--nf4-kernel-max-rows", type=int, default=64,
                        help="largest batch our NF4 kernel takes; 0 = bitsandbytes always (default: %(default)s)")


def byte_count(text: str) -> int:
    """'2147483648', '500MiB', '2GiB', '1.5G' -> bytes."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?)?b?\s*", text.lower())
    if not found:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with kB, MB, GB, "
                                         f"KiB, MiB or GiB")
    return int(float(found[1]) * _UNITS[found[2] or ""])


def memory_amount(text: str) -> float:
    """'0.9' -> a share of free memory (at most 1); '20GiB', '2147483648' -> bytes."""
    try:
        share = float(text)
    except ValueError:
        return byte_count(text)
    if not 0 < share <= 1 and share != int(share):
        raise argparse.ArgumentTypeError(f"{text!r}: give a share of free memory in (0, 1], or bytes such as 20GiB")
    return share


def server_config(args: argparse.Namespace):
    """The ServerConfig of the flags in `args` that are ServerConfig's; other commands' flags stay out."""
    from dataclasses import fields

    from .config import ServerConfig
    from .edge.call_gate import read_token

    adapters = []
    for item in getattr(args, "adapter", []):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=PATH")
        adapters.append((name, path))
    admin_file, inference_file = getattr(args, "admin_token_file", None), getattr(args, "inference_token_file", None)
    admin_token = (read_token(admin_file, "--admin-token-file") if admin_file
                   else os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None)
    inference_token = read_token(inference_file, "--inference-token-file") if inference_file else None
    names = {f.name for f in fields(ServerConfig)} - {"adapters", "admin_token", "inference_token"}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if given.get("store") == "":
        from adapters.formats.store_layout import default_store_dir

        given["store"] = str(default_store_dir())
    return ServerConfig(**given, adapters=tuple(adapters), admin_token=admin_token, inference_token=inference_token)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("cartridge")
    try:
        config = server_config(args)
        if not config.loopback_only and config.admin_token is None:
            log.warning("!" * 100)
            log.warning("LISTENING ON %s WITH NO ADMIN TOKEN: anyone who reaches port %d can register adapters, "
                        "which makes this server read files from its disk. Give --admin-token-file (or $%s), "
                        "and --adapter-root.", config.host, config.port, ADMIN_TOKEN_ENV)
            log.warning("!" * 100)
        from .app import build_server

        server = build_server(config)
    except (ValueError, OSError) as err:
        print(f"cartridge serve: {err}", file=sys.stderr)
        return 2
    # The one line scripts and tests wait for; ports are the bound ones (0 picks free ports).
    http = f", OpenAI HTTP on {server.http.scheme}://{config.host}:{server.http.port}/v1" if server.http else ""
    print(f"cartridge: serving gRPC on {config.host}:{server.port}, metrics on "
          f"http://{config.host}:{server.metrics_port}/metrics{http}", flush=True)
    signals = StopSignals()
    signals.wait()
    log.info("draining: health NOT_SERVING, new calls refused, running requests get up to %g s "
             "(a second signal ends them now)", config.drain_timeout)
    report = server.drain(config.drain_timeout, signals.hurried)
    log.info("drained in %.2f s: %d calls were running, %d of them ended with UNAVAILABLE by the drain timeout",
             report.seconds, report.in_flight, report.cut_off)
    return 0
