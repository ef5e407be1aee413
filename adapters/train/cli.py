"""`cartridge train`: a YAML file and flags -> TrainConfig -> an adapter directory with its report.

Imported by the torch-free `cartridge` command to build its flags, so torch loads only when a run starts.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING

from ..dependencies import for_training, require
from .config import ConfigError, load_train_config, setting_specs

EXIT_BAD_INPUT = 2


def user_errors() -> tuple[type[Exception], ...]:
    """Errors that mean the user's input cannot be used: reported as their message, exit status 2.
    Imported on demand, as most of them come from modules that need torch."""
    from .datasets import DataError
    from ..formats.adapter_dir import AdapterFormatError
    from ..formats.base_checkpoint import BaseModelError
    from ..formats.store_layout import StoreError
    from .checkpoint import CheckpointError

    return ConfigError, DataError, BaseModelError, CheckpointError, AdapterFormatError, StoreError


def register(commands) -> None:
    parser = commands.add_parser(
        "train", help="train a LoRA or QLoRA adapter from JSONL data",
        description="Train a LoRA or QLoRA adapter on JSONL rows ({instruction, input, output}, {messages} or "
        "{text}). Every setting can come from --config FILE (YAML, same names with underscores) and from "
        "its flag; a flag wins. Writes a peft adapter directory with training_report.json and loss_curves.png.")
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings; its relative paths are "
                        "relative to the file")
    for name, kind, default, meta in setting_specs():
        flag = meta["flag"] or "--" + name.replace("_", "-")
        # SUPPRESS keeps flags the user did not give out of the namespace, so they cannot mask the file.
        options = dict(dest=name, default=argparse.SUPPRESS, help=_help(meta["help"], default))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
        elif kind == tuple[str, ...]:
            parser.add_argument(flag, nargs="+", metavar="PATH" if meta["path"] else "NAME", **options)
        else:
            number = {int: int, float: float}.get(kind)
            metavar = None if meta["choices"] else "N" if number else "PATH" if meta["path"] else "VALUE"
            parser.add_argument(flag, type=number, choices=meta["choices"] or None, metavar=metavar, **options)
    parser.set_defaults(run=run)


def _help(text: str, default) -> str:
    if default is MISSING:
        return f"{text} (required)"
    if default is None or default == ():
        return text
    return f"{text} (default: {' '.join(default) if isinstance(default, tuple) else default})"


def run(args: argparse.Namespace) -> int:
    flags = {key: value for key, value in vars(args).items() if key not in ("command", "run", "config")}
    try:
        config = load_train_config(args.config, flags)
        require(for_training(config), "cartridge train")
    except ConfigError as err:
        print(f"cartridge train: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from .run import run_training

    try:
        report, where = run_training(config)
    except user_errors() as err:
        print(f"cartridge train: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    _print_summary(where, report)
    return 0


def _print_summary(where: str, report: dict) -> None:
    domain = report["forgetting"]["domain_validation"]
    general = report["forgetting"]["general_text"]
    training = report["training"]
    print(f"wrote {where}: adapter_config.json, adapter_model.safetensors, training_report.json, loss_curves.png")
    print(f"{training['steps']} steps in {training['training_s']:.0f} s ({training['wall_time_s']:.0f} s in all, with "
          f"loading and measuring); validation perplexity "
          f"{domain['base']['perplexity']:.3f} (base) -> {domain['adapter']['perplexity']:.3f}; general-text "
          f"perplexity {general['base']['perplexity']:.3f} -> {general['adapter']['perplexity']:.3f} "
          f"({general['perplexity_change']:+.1%})")
    recall = report["final"]["train_recall"]
    if recall is not None:
        print(f"kept the {report['training']['kept']} (step {training['kept_step']}); recall of training items "
              f"{recall['exact_match']:.1%} of {recall['items']}")
