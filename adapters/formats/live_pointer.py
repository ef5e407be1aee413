"""Moving a name's live pointer: `<store>/<name>/live.json`, and every move of it in `releases.jsonl`.
The release commands move it, and so does a server whose canary crosses its limits (a canary abort).

A move is compare-and-set under an exclusive lock on `<store>/<name>/.lock`: the caller says which
version it expects to be live (and which canary it expects running), and the move fails if another has
moved it since. So of two releases
made against the same live version, exactly one wins. The pointer is replaced by rename, so a reader
(the server polls it) sees the old pointer or the new one, never half of one, even after kill -9.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict
from datetime import datetime, timezone

from .store_layout import LIVE_FILE, LOG_FILE, LiveMove, StoreError, StoreReader, read_live

_LOCK_FILE = ".lock"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class LiveMoved(StoreError):
    """The live version is not the one the move was made against."""


def move_live(store: StoreReader, name: str, *, expected: int | None, to: int, action: str,
              gate_report_sha256: str | None, reason: str, expected_canary: int | None = None,
              canary: dict | None = None, tripped: str | None = None) -> LiveMove:
    """Makes `v<to>` live, with `canary` (None: no split), if `v<expected>` (None: nothing) still is live with
    the canary `v<expected_canary>` (None: none); LiveMoved otherwise."""
    directory = store.root / name
    with open(directory / _LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        current = read_live(store, name)
        current_version = current.to_version if current else None
        if current_version != expected:
            raise LiveMoved(f"{name}: live moved to {_label(current_version)} while this {action} was made against "
                            f"{_label(expected)}; nothing changed, check the new live version and try again")
        current_canary = current.canary_version if current else None
        if current_canary != expected_canary:
            raise LiveMoved(f"{name}: the canary is now {_canary_label(current_canary)}, while this {action} was made "
                            f"with {_canary_label(expected_canary)}; nothing changed, check `cartridge versions {name}` "
                            f"and try again")
        move = LiveMove(now(), action, expected, to, gate_report_sha256, reason, canary, tripped)
        staging = directory / f".{LIVE_FILE}.{os.getpid()}"
        with open(staging, "w") as f:
            f.write(json.dumps(asdict(move)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, directory / LIVE_FILE)
        with open(directory / LOG_FILE, "a") as log:
            log.write(json.dumps(asdict(move)) + "\n")
            log.flush()
            os.fsync(log.fileno())
    return move


def _label(version: int | None) -> str:
    return f"v{version}" if version is not None else "no live version"


def _canary_label(version: int | None) -> str:
    return f"a canary of v{version}" if version is not None else "no canary"
