"""Release, rollback and the version listing: the moves of a name's live pointer, and what allows each.

A release needs a passing gate report for exactly the candidate's bytes (its manifest's sha256), made
against the version that is live now; `force` with a reason skips that and is logged as forced. A
rollback returns to a version that was live before, so it needs no gate, only intact files.

A canary (`release --canary PCT`) needs what a release needs, and is recorded in the live pointer beside the
live version, which it leaves in place; releasing the canary's version promotes it, a rollback ends it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..formats.hashing import file_sha256
from ..formats.store_layout import (GATE_DIR, IntegrityError, LiveMove, StoredVersion, StoreError, VersionRef,
                                     check_canary_share, read_live, release_log, split_mode)
from ..formats.live_pointer import move_live, now
from ..formats.version_stats import CanaryLimits
from ..store.versions import AdapterStore

VERDICT_FILE = "verdict.json"
REPORT_FILE = "report.json"


def gate_dir(version: StoredVersion, against: int | None) -> Path:
    """Where the gate report of `version` against live `v<against>` (None: the base alone) is written, once."""
    return version.path / GATE_DIR / (f"against-v{against}" if against is not None else "against-base")


@dataclass(frozen=True, slots=True)
class Verdict:
    passed: bool
    against: int | None
    report_sha256: str
    summary: str
    time: str


def read_verdict(version: StoredVersion, against: int | None, live: StoredVersion | None) -> Verdict | None:
    """The gate's verdict on these exact bytes against `live`; None if never gated so; IntegrityError if the
    report no longer matches what the gate wrote, or was made for other bytes."""
    directory = gate_dir(version, against)
    if not (directory / VERDICT_FILE).is_file():
        return None
    raw = json.loads((directory / VERDICT_FILE).read_text())
    if raw["candidate_manifest_sha256"] != version.manifest_sha256:
        raise IntegrityError(f"{version.ref}: the gate report in {directory} was made for other bytes")
    if live is not None and raw["against_manifest_sha256"] != live.manifest_sha256:
        raise IntegrityError(f"{version.ref}: the gate report in {directory} was made against other bytes of "
                             f"{live.ref}")
    if file_sha256(directory / REPORT_FILE) != raw["report_sha256"]:
        raise IntegrityError(f"{version.ref}: {directory / REPORT_FILE} changed after the gate wrote it")
    return Verdict(raw["passed"], against, raw["report_sha256"], raw["summary"], raw["time"])


def live_version(store: AdapterStore, name: str) -> StoredVersion | None:
    move = read_live(store, name)
    return store.open(VersionRef(name, move.to_version)) if move else None


def release(store: AdapterStore, ref: VersionRef, *, force: bool, reason: str, canary: int | None = None,
            limits: CanaryLimits | None = None, shadow: int | None = None) -> LiveMove:
    """Makes `ref` live; with `canary` (percent), sends only that share of the name's requests to it instead,
    and with `limits` servers abort it when it does worse; with `shadow` (percent), runs that share of the
    requests on it too, beside the live version, whose answers alone callers get. Releasing the running
    canary's or shadow's version promotes it and ends the split."""
    if limits is not None and limits.any and canary is None:
        raise StoreError("--abort-* limits apply to a canary: give --canary PCT too")
    if canary is not None and shadow is not None:
        raise StoreError("give --canary or --shadow, not both: one experiment on a name at a time")
    if ref.number is None:
        raise StoreError(f"name the version to release, such as {ref.name}@v{max(store.version_numbers(ref.name), default=1)}")
    for share in (canary, shadow):
        if share is not None:
            check_canary_share(share)
    candidate = store.open(ref)
    current = read_live(store, ref.name)
    live = live_version(store, ref.name)
    expected = live.number if live else None
    running = current.canary if current else None
    if canary is not None or shadow is not None:
        mode = "canary" if canary is not None else "shadow"
        return _split(store, ref, candidate, live, running, mode, canary or shadow, force, reason, limits)
    if expected == candidate.number:
        raise StoreError(f"{ref} is already live" + (f"; end its {split_mode(running)} of "
                                                     f"{ref.name}@v{running['version']} with `cartridge rollback "
                                                     f"{ref.name}`" if running else ""))
    if running and running["version"] != candidate.number:
        raise StoreError(f"{ref.name}@v{running['version']} is in a {split_mode(running)} at {running['share']}%; "
                         f"promote it (`cartridge release {ref.name}@v{running['version']}`) or end it (`cartridge "
                         f"rollback {ref.name}`) before releasing {ref}")
    gate_sha = _admitted(candidate, live, force, reason)
    action = f"{split_mode(running)} promote" if running else "release"
    return move_live(store, ref.name, expected=expected, to=candidate.number,
                     action=action if gate_sha else f"forced {action}", gate_report_sha256=gate_sha, reason=reason,
                     expected_canary=running["version"] if running else None)


def _split(store: AdapterStore, ref: VersionRef, candidate: StoredVersion, live: StoredVersion | None,
           running: dict | None, mode: str, share: int, force: bool, reason: str,
           limits: CanaryLimits | None) -> LiveMove:
    """Starts or changes a canary or shadow of `candidate` at `share` percent."""
    if live is None:
        raise StoreError(f"{ref.name} has no live version to split requests with; release a first version "
                         f"without --{mode}")
    if live.number == candidate.number:
        raise StoreError(f"{ref} is the live version; a {mode} must be another version")
    if running and (running["version"] != candidate.number or split_mode(running) != mode):
        raise StoreError(f"{ref.name}@v{running['version']} is already in a {split_mode(running)} at "
                         f"{running['share']}%; one canary or shadow at a time: promote or end it (`cartridge "
                         f"rollback {ref.name}`) first")
    if running and running["share"] == share and not (limits is not None and limits.any):
        raise StoreError(f"{ref} already takes {share}% of {ref.name}'s requests")
    # Every share it is given needs the gate a release needs: a shadow's answers reach no caller, but its
    # rows share the live version's batches.
    gate_sha = _admitted(candidate, live, force, reason)
    if mode == "canary" and not running and (limits is None or not limits.any):
        limits = gate_file_limits(candidate)
    step = "change" if running else "start"
    started_at = running["started_at"] if running else now()
    # A change of share keeps the running limits unless new ones are given.
    kept = asdict(limits) if limits is not None and limits.any else (running or {}).get("limits")
    entry = {"version": candidate.number, "share": share, "started_at": started_at, "limits": kept}
    if mode == "shadow":
        entry["mode"] = "shadow"
    return move_live(store, ref.name, expected=live.number, to=live.number,
                     action=f"{mode} {step}" if gate_sha else f"forced {mode} {step}",
                     gate_report_sha256=gate_sha, reason=reason,
                     expected_canary=running["version"] if running else None, canary=entry)


def gate_file_limits(version: StoredVersion) -> CanaryLimits | None:
    """The canary section of the gate file `version` was trained with, if it names one."""
    from ..gate import GateConfig, GateConfigError

    recorded = version.manifest.get("train_config", {}).get("gate_file")
    if not recorded:
        return None
    try:
        return GateConfig.load(Path(recorded)).canary
    except GateConfigError as err:
        raise StoreError(f"{version.ref}: its gate file's canary limits cannot be used: {err}; give --abort-... "
                         f"flags instead") from None


def _admitted(candidate: StoredVersion, live: StoredVersion | None, force: bool, reason: str) -> str | None:
    """The sha256 of the passing gate report that lets `candidate` take requests from `live`; None when
    forced (with a reason); StoreError otherwise."""
    ref = candidate.ref
    if force:
        if not reason.strip():
            raise StoreError("--force needs --reason TEXT: the override is logged with it")
        return None
    expected = live.number if live else None
    verdict = read_verdict(candidate, expected, live)
    against = f"live {live.ref}" if live else "the base (nothing is live)"
    if verdict is None:
        raise StoreError(f"{ref} has no gate report against {against}; run `cartridge gate {ref}` first "
                         f"(or --force --reason TEXT)")
    if not verdict.passed:
        raise StoreError(f"{ref} failed its gate against {against}; not released:\n{verdict.summary}")
    return verdict.report_sha256


def rollback(store: AdapterStore, name: str, to: int | None, reason: str) -> LiveMove:
    """Makes the previous live version (or `v<to>`) live; with a canary or shadow running, ends it instead
    (and, with `to`, also moves the live version there)."""
    current = read_live(store, name)
    if current is None:
        raise StoreError(f"{name} has no live version to roll back")
    if current.canary is not None:
        target = to if to is not None else current.to_version
        store.open(VersionRef(name, target))  # intact, or refused before the pointer moves
        return move_live(store, name, expected=current.to_version, to=target,
                         action=f"{split_mode(current.canary)} end" if target == current.to_version else "rollback",
                         gate_report_sha256=None, reason=reason, expected_canary=current.canary_version)
    target = to if to is not None else previous_live(release_log(store, name), current.to_version)
    if target is None:
        raise StoreError(f"{name}@v{current.to_version} was the first version released; there is nothing earlier "
                         f"to roll back to (name one with --to)")
    if target == current.to_version:
        raise StoreError(f"{name}@v{target} is already live")
    store.open(VersionRef(name, target))  # intact, or refused before the pointer moves
    return move_live(store, name, expected=current.to_version, to=target, action="rollback",
                     gate_report_sha256=None, reason=reason)


def previous_live(log: list[LiveMove], current: int) -> int | None:
    """The version that was live before `current` was last released (so repeated rollbacks walk back)."""
    for move in reversed(log):
        if move.to_version == current and move.action != "rollback" and move.moves_live:
            return move.from_version
    return None


@dataclass(frozen=True, slots=True)
class VersionLine:
    number: int
    parent: int | None
    created: str
    problem: str | None                          # why the version is refused, if it is
    verdicts: list[tuple[str, bool]]             # (against what, passed)
    live: bool
    live_periods: list[tuple[str, str | None]]   # (from, until; None = still live)
    canary: dict | None = None                   # the running canary's entry, on the canary version's line
    canary_periods: list["CanaryPeriod"] = field(default_factory=list)   # ended ones, oldest first


@dataclass(frozen=True, slots=True)
class CanaryPeriod:
    start: str
    end: str
    share: int           # the largest share it reached
    ended: str           # how: the move that ended it, and for an abort the limit crossed
    mode: str = "canary"  # or "shadow"


def list_versions(store: AdapterStore, name: str) -> list[VersionLine]:
    numbers = store.version_numbers(name)
    if not numbers:
        raise StoreError(f"{name} has no versions in the store {store.root}")
    log, current = release_log(store, name), read_live(store, name)
    lines = []
    for number in numbers:
        try:
            version, problem = store.open(VersionRef(name, number)), None
        except StoreError as err:
            version, problem = None, str(err)
        lines.append(VersionLine(
            number, version.parent if version else None, version.manifest["created"] if version else "",
            problem, _verdicts(version) if version else [], bool(current and current.to_version == number),
            _periods(log, number), current.canary if current and current.canary_version == number else None,
            _canary_periods(log, number)))
    return lines


def _canary_periods(log: list[LiveMove], number: int) -> list[CanaryPeriod]:
    periods, start, share, mode = [], None, 0, "canary"
    for move in log:
        if move.canary_version == number:
            start, share, mode = start or move.time, max(share, move.canary["share"]), split_mode(move.canary)
        elif start is not None:
            ended = f"{move.action}: {move.tripped}" if move.tripped else move.action
            periods.append(CanaryPeriod(start, move.time, share, ended, mode))
            start, share = None, 0
    return periods


def _verdicts(version: StoredVersion) -> list[tuple[str, bool]]:
    found = []
    for verdict in sorted((version.path / GATE_DIR).glob(f"against-*/{VERDICT_FILE}")):
        found.append((verdict.parent.name.removeprefix("against-"), json.loads(verdict.read_text())["passed"]))
    return found


def _periods(log: list[LiveMove], number: int) -> list[tuple[str, str | None]]:
    periods: list[tuple[str, str | None]] = []
    for move in log:
        if not move.moves_live:
            continue
        if move.to_version == number:
            periods.append((move.time, None))
        elif move.from_version == number and periods and periods[-1][1] is None:
            periods[-1] = (periods[-1][0], move.time)
    return periods
