"""Immutable adapter versions in one directory: `<store>/<name>/v<N>/`, each with a manifest of sha256s.

A version is written into a staging directory and claimed by renaming it to the next free `v<N>`:
rename onto an existing, non-empty directory fails, so two writers can never take the same number
and a reader never sees half a version. Reading checks every file against the manifest and refuses
missing, changed or extra files by name. Only `gate/` may be added later, and each gate report in it
is itself written once (see adapters/release/gate_run.py).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..formats.hashing import file_sha256
from .refs import IntegrityError, StoreError, VersionNotFound, VersionRef, check_store_name

MANIFEST = "manifest.json"
GATE_DIR = "gate"
DATA_DIR = "data"
ROLES = ("train", "val", "test", "replay")
_FORMAT = 1


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True, slots=True)
class DataFile:
    role: str       # train, val (chooses or reports on weights), test (held out for the gate), replay
    path: Path      # the copy inside the version
    source: str     # where it was read from when the version was made
    sha256: str


@dataclass(frozen=True, slots=True)
class StoredVersion:
    """One checked version: its directory and manifest. Made only by AdapterStore.open."""
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


class VersionDraft:
    """A version being written: fill `path`, add data, then `commit` claims the next number."""

    def __init__(self, store: "AdapterStore", name: str):
        self.store, self.name = store, check_store_name(name)
        directory = store.root / name
        directory.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=".staging-", dir=directory))
        self._data: list[dict] = []

    def add_data(self, role: str, source: Path) -> Path:
        """Copies a data file into the version, so it can be read back whatever happens to the original."""
        target = self._data_path(role, source.name)
        shutil.copyfile(source, target)
        self._data.append({"role": role, "file": str(target.relative_to(self.path)), "source": str(source),
                           "sha256": file_sha256(target)})
        return target

    def add_data_lines(self, role: str, filename: str, lines: list[str], source: str) -> Path:
        target = self._data_path(role, filename)
        target.write_text("".join(line.rstrip("\n") + "\n" for line in lines))
        self._data.append({"role": role, "file": str(target.relative_to(self.path)), "source": source,
                           "sha256": file_sha256(target)})
        return target

    def _data_path(self, role: str, filename: str) -> Path:
        if role not in ROLES:
            raise ValueError(f"unknown data role {role!r}")
        folder = self.path / DATA_DIR / role
        folder.mkdir(parents=True, exist_ok=True)
        stem, suffix, n = Path(filename).stem, Path(filename).suffix, 1
        target = folder / filename
        while target.exists():  # two files of one role with the same name, from different folders
            n += 1
            target = folder / f"{stem}-{n}{suffix}"
        return target

    def commit(self, *, parent: int | None, record: dict) -> StoredVersion:
        """Writes the manifest (`record` holds base, config, seed, libraries...) and claims `v<N>`."""
        shutil.rmtree(self.path / "checkpoint", ignore_errors=True)  # resume state, not part of a version
        files = [rel for rel in _files(self.path) if rel != MANIFEST]
        for rel in files:  # on disk before the rename makes the version visible, even across a power cut
            _fsync(self.path / rel)
        manifest = {"format": _FORMAT, "name": self.name, "version": None, "parent": parent, "created": now(),
                    **record, "data": self._data, "files": {rel: file_sha256(self.path / rel) for rel in files}}
        directory = self.store.root / self.name
        while True:
            number = max(self.store.version_numbers(self.name), default=0) + 1
            manifest["version"] = number
            _write_durably(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
            try:
                os.rename(self.path, directory / f"v{number}")
            except OSError as err:
                if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
                    continue  # another writer claimed this number first
                raise
            _fsync(directory)
            return self.store.open(VersionRef(self.name, number))

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class AdapterStore:
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

    def draft(self, name: str) -> VersionDraft:
        return VersionDraft(self, name)

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
        present = {rel for rel in _files(path) if rel != MANIFEST and not rel.startswith(GATE_DIR + "/")}
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


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink())


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

