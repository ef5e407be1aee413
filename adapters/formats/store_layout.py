"""The adapter store on disk, read side: what the server reads and the store commands (adapters/store)
write. `<store>/<name>/v<N>/` is one immutable version with `manifest.json`, the sha256 of every file;
`<store>/<name>/live.json` the live pointer and `releases.jsonl` the log of its moves. Names of stored
adapters and their versions: `legal` (the live version) and `legal@v3` (one version).

The live pointer may also hold a canary: another version that answers a share (1 to 50 %) of the
requests for the name. Which requests is decided by `routes_to_canary`, a hash of the name, the canary
version and the request's routing key, so every server and replica splits alike and a key stays on one
version for as long as the canary runs (raising the share only adds keys).

Reading a version checks every file against its manifest and refuses missing, changed or extra
files by name. Only `gate/` may be added to a version later.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .base_checkpoint import cache_root
from .hashing import file_sha256

STORE_ENV = "CARTRIDGE_STORE"
MANIFEST = "manifest.json"
GATE_DIR = "gate"
LIVE_FILE = "live.json"
LOG_FILE = "releases.jsonl"
# Like a server adapter name, but never starting with '.', which the store keeps for its staging directories.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REF = re.compile(r"(?P<name>[^@]+)(?:@v(?P<number>\d+))?")


class StoreError(ValueError):
    """The store cannot do what was asked; the message names the version and, for damage, the file."""


class VersionNotFound(StoreError):
    pass


class IntegrityError(StoreError):
    """A version's files do not match its manifest: tampered with, or written by something other than the store."""


@dataclass(frozen=True, slots=True)
class VersionRef:
    name: str
    number: int | None  # None: whichever version is live

    def __str__(self) -> str:
        return self.name if self.number is None else f"{self.name}@v{self.number}"


def check_store_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise StoreError(f"{name!r} is not a valid adapter name: 1 to 64 letters, digits, '.', '_' or '-', "
                         f"starting with a letter or digit")
    return name


def parse_ref(text: str) -> VersionRef:
    """`legal` or `legal@v3`; StoreError for anything else."""
    match = _REF.fullmatch(text)
    if match is None:
        raise StoreError(f"{text!r} is not NAME or NAME@vN (for example legal or legal@v3)")
    number = match["number"]
    return VersionRef(check_store_name(match["name"]), int(number) if number is not None else None)


def default_store_dir() -> Path:
    """$CARTRIDGE_STORE, else `store/` under the cache directory."""
    return Path(os.environ.get(STORE_ENV) or cache_root() / "store")


@dataclass(frozen=True, slots=True)
class DataFile:
    role: str       # train, val (chooses or reports on weights), test (held out for the gate), replay
    path: Path      # the copy inside the version
    source: str     # where it was read from when the version was made
    sha256: str


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One checked version: its directory and manifest. Made only by StoreReader.open."""
    name: str
    number: int
    path: Path
    manifest: dict
    manifest_sha256: str  # "these exact bytes": the manifest names the sha256 of every other file

    @property
    def ref(self) -> VersionRef:
        return VersionRef(self.name, self.number)

    @property
    def parent(self) -> int | None:
        return self.manifest["parent"]

    def data_files(self, role: str) -> list[DataFile]:
        return [DataFile(d["role"], self.path / d["file"], d["source"], d["sha256"])
                for d in self.manifest["data"] if d["role"] == role]

    def held_out_files(self) -> list[DataFile]:
        """What the gate scores this version's domain on: its test files, else its validation files."""
        return self.data_files("test") or self.data_files("val")


class StoreReader:
    """Every version of every name under `root`, read and checked; adapters/store's AdapterStore also writes."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and self.version_numbers(p.name))

    def version_numbers(self, name: str) -> list[int]:
        directory = self.root / name
        if not directory.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in directory.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit())

    def open(self, ref: VersionRef) -> StoredVersion:
        """The version `ref` names (`ref.number` set), after checking every file against its manifest."""
        path = self.root / ref.name / f"v{ref.number}"
        if not path.is_dir():
            known = ", ".join(f"v{n}" for n in self.version_numbers(ref.name)) or "none"
            raise VersionNotFound(f"{ref} is not in the store {self.root} (versions of {ref.name}: {known})")
        manifest_file = path / MANIFEST
        try:
            raw = manifest_file.read_bytes()
            manifest = json.loads(raw)
        except FileNotFoundError:
            raise IntegrityError(f"{ref}: {manifest_file} is missing: the version is half-written or was not "
                                 f"written by the store; refusing it") from None
        except (OSError, json.JSONDecodeError) as err:
            raise IntegrityError(f"{ref}: {manifest_file} cannot be read ({err}); refusing the version") from None
        if manifest.get("name") != ref.name or manifest.get("version") != ref.number:
            raise IntegrityError(f"{ref}: {manifest_file} describes {manifest.get('name')}@v{manifest.get('version')}")
        listed: dict[str, str] = manifest["files"]
        present = {rel for rel in files_of(path) if rel != MANIFEST and not rel.startswith(GATE_DIR + "/")}
        for rel in sorted(present - listed.keys()):
            raise IntegrityError(f"{ref}: {path / rel} is not in the manifest (added after the version was written)")
        for rel, expected in sorted(listed.items()):
            if rel not in present:
                raise IntegrityError(f"{ref}: {path / rel} is missing (the manifest lists it)")
            if file_sha256(path / rel) != expected:
                raise IntegrityError(f"{ref}: {path / rel} does not match its sha256 in the manifest: "
                                     f"it changed after the version was written")
        return StoredVersion(ref.name, ref.number, path, manifest, hashlib.sha256(raw).hexdigest())

    def lineage(self, version: StoredVersion) -> list[StoredVersion]:
        """The versions `version` was trained from, its parent first, each checked."""
        found, parent = [], version.parent
        while parent is not None:
            earlier = self.open(VersionRef(version.name, parent))
            found.append(earlier)
            parent = earlier.parent
        return found


CANARY_MIN_SHARE, CANARY_MAX_SHARE = 1, 50
# Moves that start, change or end a canary leave the live version where it was (from_version == to_version).
CANARY_ACTIONS = ("canary start", "forced canary start", "canary change", "forced canary change", "canary end",
                  "canary aborted", "shadow start", "forced shadow start", "shadow change", "forced shadow change",
                  "shadow end")


@dataclass(frozen=True, slots=True)
class LiveMove:
    """One line of the release log, and the content of the live pointer after it."""
    time: str
    action: str                       # release, forced release, rollback, canary promote, or a CANARY_ACTIONS one
    from_version: int | None
    to_version: int
    gate_report_sha256: str | None    # of the gate report the release relied on; None for rollbacks and forced ones
    reason: str
    # The canary running after this move: {"version": N, "share": percent, "started_at": time, "limits": {...}}
    # (limits: adapters/formats/version_stats.CanaryLimits' fields, absent or null when none); with "mode":
    # "shadow", a shadow instead: the share also runs on the version, callers get the live answer. None: neither.
    canary: dict | None = None
    tripped: str | None = None        # canary aborted: the limit crossed, with the numbers

    @property
    def canary_version(self) -> int | None:
        return self.canary["version"] if self.canary else None

    @property
    def moves_live(self) -> bool:
        """Whether this move changed the live version (canary starts, changes and ends do not)."""
        return self.action not in CANARY_ACTIONS


def split_mode(entry: dict | None) -> str:
    """"canary" or "shadow": what a live pointer's split entry runs (entries written before shadows: canary)."""
    return (entry or {}).get("mode", "canary")


def check_canary_share(share: int) -> int:
    if isinstance(share, bool) or not isinstance(share, int) or not CANARY_MIN_SHARE <= share <= CANARY_MAX_SHARE:
        raise StoreError(f"--canary {share!r}: a canary takes {CANARY_MIN_SHARE} to {CANARY_MAX_SHARE} percent of "
                         f"the requests (release without --canary to send them all)")
    return share


def routes_to_canary(name: str, canary_version: int, share: int, key: str) -> bool:
    """Whether the request with routing `key` goes to `name`'s canary `v<canary_version>` at `share` percent.
    Stable across processes and machines (sha256, not Python's salted hash); a key in the canary at one
    share stays in it at any higher share."""
    digest = hashlib.sha256(f"{name}\0v{canary_version}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < share * 100


def live_file(store: StoreReader, name: str) -> Path:
    return store.root / name / LIVE_FILE


def log_file(store: StoreReader, name: str) -> Path:
    return store.root / name / LOG_FILE


def read_live(store: StoreReader, name: str) -> LiveMove | None:
    """The move that made the live version live; None when the name has never been released."""
    try:
        return LiveMove(**json.loads(live_file(store, name).read_text()))
    except FileNotFoundError:
        return None


def release_log(store: StoreReader, name: str) -> list[LiveMove]:
    try:
        lines = log_file(store, name).read_text().splitlines()
    except FileNotFoundError:
        return []
    return [LiveMove(**json.loads(line)) for line in lines if line.strip()]


def files_of(root: Path) -> list[str]:
    """Every file under `root`, relative to it, sorted."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())
