"""`cartridge serve-ray`: the Ray Serve application (server/ray/app.py) on a Ray cluster, started here or given.

    cartridge serve-ray --replicas 2 --store /shared/store --http-port 8000 --grpc-port 9000

Ray is an extra (`pip install 'cartridge[ray]'`): it is imported only when the command runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from ..cli import engine_flags, server_config, store_flag
from ..stop_signals import StopSignals

INFERENCE_SERVICER = "cartridge.v1.inference_pb2_grpc.add_InferenceServicer_to_server"


def register(commands) -> None:
    parser = commands.add_parser("serve-ray", help="serve on Ray Serve: N engine replicas with adapter affinity",
                                 description="N Cartridge engines behind Ray Serve's HTTP (OpenAI) and gRPC "
                                 "proxies; each adapter's requests go to replicas that hold it.")
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas (default: %(default)s)")
    source = parser.add_mutually_exclusive_group(required=True)
    store_flag(source)
    source.add_argument("--adapter-root", metavar="DIR",
                        help="instead of a store: a directory every replica reads; each subdirectory is a peft "
                        "adapter named by it")
    parser.add_argument("--host", default="127.0.0.1", help="address of Ray's proxies (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="Ray's HTTP proxy (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=9000, help="Ray's gRPC proxy (default: %(default)s)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="(default: %(default)s)")
    parser.add_argument("--gpus-per-replica", type=float, help="default: 1 on a CUDA device, else 0")
    parser.add_argument("--address", help="a running Ray cluster (default: start one here)")
    parser.add_argument("--object-store-bytes", type=int, default=256 * 2**20,
                        help="Ray object store of a cluster started here (default: %(default)s)")
    engine_flags(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = server_config(args)
        if args.replicas < 1:
            raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
        # Absolute, as every Ray worker sees them whatever its working directory.
        config = dataclasses.replace(config, **{field: str(Path(value).resolve()) for field in ("store", "adapter_root")
                                                if (value := getattr(config, field)) is not None})
    except ValueError as err:
        print(f"cartridge serve-ray: {err}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    from .app import APP_NAME, build_app

    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(config.on_cuda)
    if args.address:
        ray.init(address=args.address)
    else:
        ray.init(object_store_memory=args.object_store_bytes, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.http_port},
                grpc_options={"port": args.grpc_port,
                              "grpc_servicer_functions": [INFERENCE_SERVICER]})
    serve.run(build_app(config, args.replicas, args.cpus_per_replica, gpus),
              name=APP_NAME, route_prefix="/")
    print(f"cartridge: Ray Serve with {args.replicas} replicas, OpenAI HTTP on http://{args.host}:{args.http_port}/v1, "
          f"gRPC on {args.host}:{args.grpc_port} (metadata application={APP_NAME})", flush=True)
    StopSignals().wait()
    serve.shutdown()
    ray.shutdown()
    return 0
