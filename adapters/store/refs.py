"""Names of stored adapters and their versions: `legal` (the live version) and `legal@v3` (one version)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..formats.base_checkpoint import cache_root

STORE_ENV = "CARTRIDGE_STORE"
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
