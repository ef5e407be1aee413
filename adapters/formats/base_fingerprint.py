"""Which base an adapter was made for: a fingerprint of the base's weights, recorded by training.

Shapes alone cannot tell two bases of one architecture apart (a fine-tune of the base, another
checkpoint of the same size), and an adapter on the wrong one answers wrongly without a word. Our
trainer records the base's fingerprint in the adapter's training_report.json; the server and
`cartridge eval` compare it with the base they hold.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from .adapter_dir import AdapterFormatError

TRAINING_REPORT_FILE = "training_report.json"
_CHUNK = 1 << 20


def base_fingerprint(base_dir: Path) -> str:
    """sha256 over every tensor of the base's safetensors files: name, dtype, shape and bytes, in name order.

    Only the weights count. File headers and config.json carry the version of the library that wrote
    them, which must not make one base look like another."""
    tensors = []  # (name, file, dtype, shape, begin, end), offsets from the start of the file
    for path in sorted(Path(base_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        for name, entry in header.items():
            if name != "__metadata__":
                begin, end = entry["data_offsets"]
                tensors.append((name, path, entry["dtype"], entry["shape"], 8 + header_size + begin,
                                8 + header_size + end))
    digest = hashlib.sha256()
    handles = {}
    try:
        for name, path, dtype, shape, begin, end in sorted(tensors):
            f = handles.get(path) or handles.setdefault(path, open(path, "rb"))
            digest.update(f"{name}|{dtype}|{shape}\n".encode())
            f.seek(begin)
            for offset in range(begin, end, _CHUNK):
                digest.update(f.read(min(_CHUNK, end - offset)))
    finally:
        for f in handles.values():
            f.close()
    return digest.hexdigest()


def recorded_base_fingerprint(adapter_dir: Path) -> str | None:
    """The fingerprint of the base the adapter was trained on, as its training report gives it; None if none does."""
    try:
        recorded = json.loads((Path(adapter_dir) / TRAINING_REPORT_FILE).read_text())["base"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return recorded if isinstance(recorded, str) else None


def check_made_for(adapter_dir: Path, fingerprint: Callable[[], str]) -> bool:
    """Raises AdapterFormatError when the adapter records another base than the one `fingerprint` hashes
    (called only when there is something to compare); False when it records none, so the caller can warn."""
    recorded = recorded_base_fingerprint(adapter_dir)
    if recorded is None:
        return False
    actual = fingerprint()
    if recorded != actual:
        raise AdapterFormatError(
            f"{adapter_dir}: was trained on a base with fingerprint {recorded[:16]}… ({TRAINING_REPORT_FILE}), "
            f"but this base's is {actual[:16]}…: same shapes, other weights, so its answers would be wrong")
    return True
