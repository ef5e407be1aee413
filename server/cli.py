"""`cartridge serve`: flags -> ServerConfig -> a running server."""
from __future__ import annotations

import argparse


def register(commands) -> None:
    parser = commands.add_parser("serve", help="start the gRPC server")
    parser.set_defaults(run=lambda args: print("not yet"))
