"""Which adapter directories the server may read, how large they may be, and what their bytes were.

A path is judged after every symlink in it is followed, its two files included, so a link that
leads out of `--adapter-root` is refused like a plain path outside it. Sizes come from the file
system before a byte is read. The files are checked and then opened by path, so a process that
can rewrite the adapter root between the two could still swap them: the root must be writable
only by whoever may register adapters.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from adapters.formats.adapter_dir import CONFIG_FILE, WEIGHTS_FILE

from ..errors import InvalidArgument, NotFound, PermissionDenied

MAX_CONFIG_BYTES = 1 << 20   # an adapter_config.json is a few hundred bytes


@dataclass(frozen=True, slots=True)
class AdapterFiles:
    """An adapter directory that passed the rules, with every link followed."""
    directory: Path

    def sha256(self) -> tuple[str, str]:
        """(config, weights) sha256 hex digests, read in 1 MiB blocks."""
        return tuple(_sha256(self.directory / name) for name in (CONFIG_FILE, WEIGHTS_FILE))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while block := stream.read(1 << 20):
                digest.update(block)
    except FileNotFoundError:
        return ""   # a missing file is reported by the reader, with the peft-specific advice
    return digest.hexdigest()


class AdapterFilePolicy:
    def __init__(self, root: str | None, max_weights_bytes: int):
        self.root = Path(root).resolve() if root else None
        self.max_weights_bytes = max_weights_bytes

    def check(self, path: str) -> AdapterFiles:
        if not path:
            raise InvalidArgument("path is empty: give the adapter directory as the server sees it")
        given = Path(path)
        if self.root is not None and not given.is_absolute():
            given = self.root / given
        directory = given.resolve()
        self._inside_root(directory, f"path {path!r}")
        if not directory.exists():
            raise NotFound(f"path {path!r} does not exist on the server")
        for name, limit, flag in ((CONFIG_FILE, MAX_CONFIG_BYTES, None),
                                  (WEIGHTS_FILE, self.max_weights_bytes, "--max-adapter-bytes")):
            file = directory / name
            if not file.exists():
                continue
            self._inside_root(file.resolve(), f"{name} in {path!r}")
            size = file.stat().st_size
            if size > limit:
                why = f"this server's {flag} {limit}" if flag else f"the {limit}-byte limit for a config"
                raise InvalidArgument(f"{name} in {path!r} is {size} bytes, over {why}; nothing was read")
        return AdapterFiles(directory)

    def _inside_root(self, resolved: Path, what: str) -> None:
        if self.root is not None and not resolved.is_relative_to(self.root):
            raise PermissionDenied(f"{what} leads outside this server's --adapter-root {self.root} "
                                   f"(symlinks followed); only adapters under it can be registered")
