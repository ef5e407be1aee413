"""Modes of what is written through a staging directory: those a plain open() or mkdir() gives under the umask.

tempfile.mkdtemp makes its directory 0700, and safetensors (0.8) writes every file 0600 through a
temporary file of its own. A directory renamed into place from there (a merged export, a store version,
the converted base, a gate report) or an adapter file would be unreadable for a server running as
another user, unlike every other file the commands write.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    # The only way to read it is to set it; the commands that call this do so from their one writing thread.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """`path`, and for a directory everything below it: directories 0777 and files 0666, less the umask.
    Links are left alone (chmod would follow them out of `path`)."""
    mask = current_umask()
    if path.is_symlink():
        return
    if not path.is_dir():
        os.chmod(path, 0o666 & ~mask)
        return
    for directory, _, files in os.walk(path):
        os.chmod(directory, 0o777 & ~mask)
        for name in files:
            file = os.path.join(directory, name)
            if not os.path.islink(file):
                os.chmod(file, 0o666 & ~mask)
