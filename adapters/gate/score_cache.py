"""Scores of a model on the gate's items, kept between gate runs.

The base never changes and today's candidate is tomorrow's live version, so in a run of releases
only the candidate's scores are new: the base's and the live version's come from here, on the
suites (per-item answer losses and exact matches), the general text and the general sets alike.
Keys hash everything a score depends on (the model's weights, the items' bytes, the settings that
change a score, the scoring code's version), so a stale entry cannot be read back.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..formats.adapter_dir import CONFIG_FILE, WEIGHTS_FILE
from ..formats.hashing import file_sha256

SCORING_VERSION = 2  # bump when scoring.py changes what it returns for the same model and items


def model_identity(base_fingerprint: str, adapter: Path | None, quantized: bool) -> str:
    parts = [base_fingerprint, "nf4" if quantized else "dense"]
    if adapter is not None:
        parts += [file_sha256(adapter / CONFIG_FILE), file_sha256(adapter / WEIGHTS_FILE)]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


class ScoreCache:
    """JSON values under keys made by `key`; `enabled=False` reads nothing back but still writes."""

    def __init__(self, root: Path, enabled: bool = True):
        self.root = root
        self.enabled = enabled

    @staticmethod
    def key(kind: str, identity: str, *described) -> str:
        """`kind` (suite, text, choices), the model, and what the score was made of, as JSON-able values."""
        return hashlib.sha256(json.dumps([SCORING_VERSION, kind, identity, *described]).encode()).hexdigest()

    def get(self, key: str):
        if not self.enabled:
            return None
        try:
            return json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, value) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so a reader never sees half a file, whoever writes at the same time.
        handle, staging = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(value, f)
        os.replace(staging, self.root / f"{key}.json")
