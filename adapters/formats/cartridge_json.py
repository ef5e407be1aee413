"""`cartridge.json`, an adapter directory's request defaults: what a request to the adapter gets for a field
it leaves unset (an extraction cartridge answers in JSON by default).

    {"response_format": {"type": "json_schema", "json_schema": {"name": "order", "schema": {...}}},
     "temperature": 0, "max_tokens": 128, "frequency_penalty": 0.2}

Here only the file's shape is checked (known keys, JSON types); the server checks the values as it checks a
request's, when the adapter is registered. In the store the file is one of the version's files, so the
manifest's sha256 covers it like the weights.
"""
from __future__ import annotations

import json
from pathlib import Path

from .adapter_dir import AdapterFormatError

DEFAULTS_FILE = "cartridge.json"
MAX_DEFAULTS_BYTES = 1 << 20
# key -> the JSON types it may hold (bool is no number here, as in JSON)
KEYS: dict[str, tuple[type, ...]] = {
    "response_format": (dict,), "temperature": (int, float), "top_p": (int, float), "max_tokens": (int,),
    "presence_penalty": (int, float), "frequency_penalty": (int, float), "repetition_penalty": (int, float),
}


def read_defaults(directory: Path) -> dict:
    """The defaults in `directory`/cartridge.json ({} when there is none), shape-checked."""
    path = directory / DEFAULTS_FILE
    return read_defaults_file(path) if path.exists() else {}


def read_defaults_file(path: Path) -> dict:
    """The defaults in the file `path` (a cartridge.json, whatever its name), shape-checked."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: not a file")
    if path.stat().st_size > MAX_DEFAULTS_BYTES:
        raise AdapterFormatError(f"{path}: over {MAX_DEFAULTS_BYTES} bytes; defaults are a few hundred")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object of defaults")
    for key, value in raw.items():
        if key not in KEYS:
            raise AdapterFormatError(f"{path}: {key!r} is not a default this server knows; expected some of "
                                     f"{sorted(KEYS)}")
        if isinstance(value, bool) or not isinstance(value, KEYS[key]):
            kind = "an object" if KEYS[key] == (dict,) else "an integer" if KEYS[key] == (int,) else "a number"
            raise AdapterFormatError(f"{path}: {key!r} must be {kind}, got {value!r}")
    return raw
