"""`cartridge gate | release | rollback | versions`: the lifecycle of a stored adapter, from the command line.

Only `gate` loads torch (it runs models); the others read and move pointers and start at once.
Exit status: 0 done (gate: PASS), 1 refused (gate: FAIL), 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..formats.version_stats import CanaryLimits
from ..formats.store_layout import (CANARY_MAX_SHARE, CANARY_MIN_SHARE, StoreError, default_store_dir, parse_ref,
                                    split_mode)
from ..store.versions import AdapterStore

EXIT_REFUSED, EXIT_BAD_INPUT = 1, 2


def _store_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR", help="adapter store (default: $CARTRIDGE_STORE, else store/ in "
                        "the cache directory)")


def _store(args: argparse.Namespace) -> AdapterStore:
    return AdapterStore(Path(args.store) if args.store else default_store_dir())


def register_gate(commands) -> None:
    p = commands.add_parser("gate", help="check a stored version against the live one before release",
                            description="Score NAME@vN against the live version and the base: what it learned, "
                            "what it must retain, general ability. Prints PASS or FAIL (exit 0 or 1) and writes "
                            "the report into the version.")
    p.add_argument("version", help="NAME@vN")
    p.add_argument("--gate-file", metavar="FILE", help="gate limits (YAML; default: the gate_file the version "
                   "was trained with, else the defaults)")
    p.add_argument("--suite", action="append", default=[], metavar="NAME=FILE",
                   help="another retained suite, JSONL in the trainer's formats (repeatable)")
    _store_flag(p)
    p.set_defaults(run=_gate)


def register_release(commands) -> None:
    p = commands.add_parser("release", help="make a gated version live",
                            description="Move NAME's live pointer to NAME@vN, if its gate report against the "
                            "current live version passed. Running servers switch within a second.")
    p.add_argument("version", help="NAME@vN")
    p.add_argument("--canary", metavar="PCT", help="send only PCT percent (1 to 50) of NAME's requests to the "
                   "version, the rest staying on the live one; again with another PCT changes the share. Without "
                   "--canary, releasing the canary's version promotes it to all requests")
    abort = p.add_argument_group("automatic abort of a canary", "Every server following the store checks these "
                                 "every few seconds (serve --canary-check-s) against the live version, and ends "
                                 "the canary when one is crossed; releases.jsonl logs 'canary aborted' with the "
                                 "numbers. Default: the canary section of the gate file the version was trained "
                                 "with (error_rate, tpot_pct, feedback_min_n), else none.")
    abort.add_argument("--abort-error-rate", type=float, metavar="X", help="abort when the canary's error rate "
                       "(the low end of its 95%% interval) is above the live version's plus X, e.g. 0.05")
    abort.add_argument("--abort-tpot-pct", type=float, metavar="Y", help="abort when the canary's p95 time per "
                       "output token is more than Y %% above the live version's (after 20 requests each)")
    abort.add_argument("--abort-feedback-min-n", type=int, metavar="N", help="abort when the canary's mean "
                       "feedback is lower than the live version's with p < 0.05, once each has N ratings (N >= 30)")
    p.add_argument("--shadow", metavar="PCT", help="run PCT percent (1 to 50) of NAME's requests on the version "
                   "too, in the same batches, and record how its answers compare; callers get the live version's "
                   "answers alone. Releasing the version without --shadow promotes it; rollback ends the shadow")
    p.add_argument("--force", action="store_true", help="release without a passing gate report (needs --reason)")
    p.add_argument("--reason", default="", help="why; logged with the release")
    _store_flag(p)
    p.set_defaults(run=_release)


def register_rollback(commands) -> None:
    p = commands.add_parser("rollback", help="make the previous live version live again",
                            description="Move NAME's live pointer back to the version live before the current "
                            "one, or to --to vN. With a canary running, end the canary instead: every request goes "
                            "to the live version again.")
    p.add_argument("name")
    p.add_argument("--to", metavar="vN", help="the version to return to")
    p.add_argument("--reason", default="", help="why; logged with the rollback")
    _store_flag(p)
    p.set_defaults(run=_rollback)


def register_versions(commands) -> None:
    p = commands.add_parser("versions", help="list a stored adapter's versions",
                            description="Every version of NAME: parent, gate verdicts, the live marker (*) and "
                            "when each was live; a running canary is marked ~ with its share, and each ended canary "
                            "period is listed under its version with how it ended (end, promote, abort and why).")
    p.add_argument("name")
    _store_flag(p)
    p.set_defaults(run=_versions)


def _refusing(action):
    """Runs `action`, turning store errors into their message and exit status 1."""
    def run(args: argparse.Namespace) -> int:
        try:
            return action(args) or 0
        except StoreError as err:
            print(f"cartridge {args.command}: {err}", file=sys.stderr)
            return EXIT_REFUSED
    return run


@_refusing
def _gate(args: argparse.Namespace) -> int:
    from ..gate import GateConfigError, GeneralSetError
    from ..train.cli import user_errors
    from .gate_run import gate_version

    extra = []
    for item in args.suite:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            print(f"cartridge gate: --suite {item!r}: expected NAME=FILE", file=sys.stderr)
            return EXIT_BAD_INPUT
        extra.append((name, Path(path).resolve()))
    try:
        outcome = gate_version(_store(args), parse_ref(args.version), Path(args.gate_file) if args.gate_file else None,
                               extra)
    except StoreError:
        raise
    except (GateConfigError, GeneralSetError, *user_errors()) as err:
        print(f"cartridge gate: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if outcome.earlier:
        print(f"(gated earlier, at {outcome.verdict.time}; a version is gated against one live version once)")
    print(outcome.verdict.summary)
    print(f"report: {outcome.directory}")
    return 0 if outcome.verdict.passed else EXIT_REFUSED


@_refusing
def _release(args: argparse.Namespace) -> int | None:
    from .lifecycle import release

    shares = {}
    for flag in ("canary", "shadow"):
        text = getattr(args, flag)
        if text is None:
            continue
        if not text.strip().isdigit() or not CANARY_MIN_SHARE <= int(text) <= CANARY_MAX_SHARE:
            print(f"cartridge release: --{flag} {text!r}: expected a whole percent from {CANARY_MIN_SHARE} to "
                  f"{CANARY_MAX_SHARE}", file=sys.stderr)
            return EXIT_BAD_INPUT
        shares[flag] = int(text)
    try:
        limits = CanaryLimits(args.abort_error_rate, args.abort_tpot_pct, args.abort_feedback_min_n)
    except ValueError as err:
        print(f"cartridge release: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    move = release(_store(args), parse_ref(args.version), force=args.force, reason=args.reason, limits=limits,
                   **shares)
    name = parse_ref(args.version).name
    if move.canary is not None and split_mode(move.canary) == "shadow":
        print(f"{name}: shadow {name}@v{move.canary['version']} also runs {move.canary['share']}% of requests, live "
              f"{name}@v{move.to_version} answers them all ({move.action}, {move.time})")
        return None
    if move.canary is not None:
        limits = move.canary.get("limits")
        watched = "; aborted by servers past " + ", ".join(f"{k}={v:g}" for k, v in limits.items() if v is not None) \
            if limits else ""
        print(f"{name}: canary {name}@v{move.canary['version']} takes {move.canary['share']}% of requests, live "
              f"{name}@v{move.to_version} the rest ({move.action}, {move.time}){watched}")
        return None
    was = f"{name}@v{move.from_version}" if move.from_version is not None else "nothing"
    print(f"{name}: live {was} -> {name}@v{move.to_version} ({move.action}, {move.time})")
    return None


@_refusing
def _rollback(args: argparse.Namespace) -> None:
    from .lifecycle import rollback

    to = None
    if args.to is not None:
        if not (args.to.removeprefix("v").isdigit()):
            raise StoreError(f"--to {args.to!r}: expected a version such as v2")
        to = int(args.to.removeprefix("v"))
    move = rollback(_store(args), args.name, to, args.reason)
    if move.action in ("canary end", "shadow end"):
        print(f"{args.name}: {move.action.split()[0]} ended, live {args.name}@v{move.to_version} takes every request "
              f"({move.time})")
        return
    print(f"{args.name}: live {args.name}@v{move.from_version} -> {args.name}@v{move.to_version} "
          f"(rollback, {move.time})")


@_refusing
def _versions(args: argparse.Namespace) -> None:
    from .lifecycle import list_versions

    for line in list_versions(_store(args), args.name):
        marker = "*" if line.live else "~" if line.canary else " "
        mode = split_mode(line.canary)
        if line.problem:
            print(f"{marker} v{line.number}\tREFUSED: {line.problem}")
        else:
            parent = f"from v{line.parent}" if line.parent is not None else "new"
            gates = ", ".join(f"{'PASS' if ok else 'FAIL'} vs {against}"
                              for against, ok in line.verdicts) or "not gated"
            periods = "; ".join(f"{start} to {end or 'now'}" for start, end in line.live_periods) or "never live"
            canary = f"\t{mode}: {line.canary['share']}% since {line.canary['started_at']}" if line.canary else ""
            print(f"{marker} v{line.number}\t{parent}\t{line.created}\t{gates}\tlive: {periods}{canary}")
        for period in line.canary_periods:
            print(f"    {period.mode} {period.share}%: {period.start} to {period.end} ({period.ended})")
