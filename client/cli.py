"""The `cartridge` command.

Client subcommands (generate, adapters) live here and need only grpc. Subcommands that need the
engine (serve, train, eval, merge) are plugged in through the `cartridge.commands` entry points, so
this module never imports server/ or adapters/ and `cartridge generate` starts without torch.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cartridge", description=__doc__.splitlines()[0].strip("."))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for plugin in sorted(entry_points(group="cartridge.commands"), key=lambda ep: ep.name):
        plugin.load()(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
