"""Writing immutable adapter versions: `<store>/<name>/v<N>/`, each with a manifest of sha256s (reading and
checking them is adapters/formats/store_layout.py, which the server shares).

A version is written into a staging directory and claimed by renaming it to the next free `v<N>`:
rename onto an existing, non-empty directory fails, so two writers can never take the same number
and a reader never sees half a version. Only `gate/` may be added later, and each gate report in it
is itself written once (see adapters/release/gate_run.py).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..formats.file_modes import follow_umask
from ..formats.hashing import file_sha256
from ..formats.live_pointer import now
from ..formats.store_layout import MANIFEST, StoredVersion, StoreReader, VersionRef, check_store_name, files_of

DATA_DIR = "data"
ROLES = ("train", "val", "test", "replay")
_FORMAT = 1



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
        follow_umask(self.path)   # a server running as another user reads it
        files = [rel for rel in files_of(self.path) if rel != MANIFEST]
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


class AdapterStore(StoreReader):
    """The store's read side, and `draft` to write a new version."""

    def draft(self, name: str) -> VersionDraft:
        return VersionDraft(self, name)


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

