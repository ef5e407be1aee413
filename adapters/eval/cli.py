"""`cartridge eval`: flags -> EvalConfig -> figures for an adapter and the base alone, printed and as JSON.

Settings the user leaves out are taken from the adapter's training_report.json when it has one, so
evaluating a fresh adapter on its validation file gives back the report's own figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..dependencies import for_eval, require
from ..train.cli import EXIT_BAD_INPUT, user_errors
from ..train.config import ConfigError, TrainConfig, setting_specs

# Settings eval shares with training; unset, these come from the adapter's report, then train's defaults.
_AS_TRAINED = ("base_model", "max_seq_len", "general_eval_tokens", "max_rejected_fraction")
_SHARED = (*_AS_TRAINED, "device")


def register(commands) -> None:
    parser = commands.add_parser(
        "eval", help="measure an adapter against the base: perplexity, exact match, forgetting",
        description="Measure an adapter and the base alone on JSONL data (any of the training row forms) and on "
        "general text: loss and perplexity of the answer tokens, and exact-match accuracy of greedy answers on "
        "rows that have one. Unset options default to the adapter's training_report.json, then to train's defaults.")
    parser.add_argument("--adapter", required=True, metavar="DIR", help="peft adapter directory")
    parser.add_argument("--data", required=True, nargs="+", metavar="FILE", help="JSONL files, measured one by one")
    for name, kind, default, meta in setting_specs():
        if name in _SHARED:
            number = {int: int, float: float}.get(kind)
            parser.add_argument("--" + name.replace("_", "-"), type=number, metavar="N" if number else "VALUE",
                                help=f"{meta['help']} (default: {'as trained' if name in _AS_TRAINED else default})")
    parser.add_argument("--quantization", choices=("nf4", "none"), help="base weights: nf4 for QLoRA adapters "
                        "(default: as trained)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="default: %(default)s")
    parser.add_argument("--output", metavar="FILE", help="also write the figures as JSON here")
    parser.set_defaults(run=run)


def _config(args: argparse.Namespace):
    from .run import EvalConfig  # needs torch, as every eval does

    adapter = Path(args.adapter)
    trained = _trained_settings(adapter)
    chosen = {key: getattr(args, key) if getattr(args, key) is not None
              else trained.get(key) if key in trained and key in _AS_TRAINED
              else TrainConfig.__dataclass_fields__[key].default for key in _SHARED}
    quantized = (args.quantization == "nf4" if args.quantization is not None
                 else trained.get("method") == "qlora")
    if args.batch_size <= 0 or chosen["max_seq_len"] <= 0 or chosen["general_eval_tokens"] <= 0:
        raise ConfigError("--batch-size, --max-seq-len and --general-eval-tokens must be positive")
    return EvalConfig(adapter=adapter, data=tuple(args.data), quantized=quantized, batch_size=args.batch_size,
                      **chosen)


def _trained_settings(adapter: Path) -> dict:
    from ..train.report import REPORT_FILE

    try:
        return json.loads((adapter / REPORT_FILE).read_text())["hyperparameters"]
    except (OSError, ValueError, KeyError):
        return {}


def run(args: argparse.Namespace) -> int:
    try:
        config = _config(args)
        require(for_eval(config.quantized), "cartridge eval")
        from .run import run_eval

        figures = run_eval(config)
    except user_errors() as err:
        print(f"cartridge eval: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=1))
    _print_table(figures)
    return 0


def _print_table(figures: dict) -> None:
    print(f"adapter {figures['adapter']} on base {figures['base']['path']} "
          f"(quantization {figures['base']['quantization']})")
    print(f"{'data':<40} {'rows':>5}  {'loss':>15}  {'perplexity':>17}  {'exact match':>15}")
    rows = [(entry["files"][0]["path"], str(entry["rows_used"]), entry) for entry in figures["data"]]
    rows.append(("general text (Python docstrings)", "", figures["general_text"]))
    for name, count, entry in rows:
        base, adapter = entry["base"], entry["adapter"]
        matched = ("-" if base["exact_match"] is None
                   else f"{base['exact_match']:6.1%} -> {adapter['exact_match']:6.1%}")
        print(f"{name[-40:]:<40} {count:>5}  {base['loss']:6.3f} -> {adapter['loss']:6.3f}  "
              f"{base['perplexity']:7.3f} -> {adapter['perplexity']:7.3f}  {matched:>15}")
    print("(base -> adapter)")
