"""`import_path: server.ray.entry:app` for a RayService (KubeRay) or `serve run`: the application of
`cartridge serve-ray`, configured from the environment instead of flags.

    CARTRIDGE_STORE          the adapter store every replica reads (or, instead:)
    CARTRIDGE_ADAPTER_ROOT   a directory of peft adapters every replica reads
    CARTRIDGE_REPLICAS       engine replicas (default 2)
    CARTRIDGE_SERVE_ARGS     engine flags of `cartridge serve`, e.g. "--max-adapters 16 --max-lora-rank 64"
    CARTRIDGE_GPUS_PER_REPLICA / CARTRIDGE_CPUS_PER_REPLICA   (default: 1 GPU on CUDA, else 0; 1 CPU)
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex

from adapters.formats.store_layout import STORE_ENV

from ..cli import engine_flags, server_config
from .app import build_app


def _app():
    parser = argparse.ArgumentParser(prog="CARTRIDGE_SERVE_ARGS")
    engine_flags(parser)
    config = server_config(parser.parse_args(shlex.split(os.environ.get("CARTRIDGE_SERVE_ARGS", ""))))
    store, root = os.environ.get(STORE_ENV) or None, os.environ.get("CARTRIDGE_ADAPTER_ROOT") or None
    if (store is None) == (root is None):
        raise ValueError(f"set one of {STORE_ENV} and CARTRIDGE_ADAPTER_ROOT: the adapters every replica reads")
    gpus = os.environ.get("CARTRIDGE_GPUS_PER_REPLICA")
    return build_app(dataclasses.replace(config, store=store, adapter_root=root),
                     int(os.environ.get("CARTRIDGE_REPLICAS", "2")),
                     float(os.environ.get("CARTRIDGE_CPUS_PER_REPLICA", "1")),
                     float(gpus) if gpus is not None else float(config.on_cuda))


app = _app()
