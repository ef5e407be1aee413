"""Choices of a model on a general set, kept between gate runs.

The base never changes and today's candidate is tomorrow's live version, so in a run of releases
only the candidate's choices are new; the base's and the live version's come from here. Keys hash
everything the choices depend on (the model's weights, the items, the scoring code's version), so a
stale entry cannot be read back.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from ..formats.adapter_dir import CONFIG_FILE, WEIGHTS_FILE
from ..formats.hashing import file_sha256
from .general_sets import ChoiceSet

SCORING_VERSION = 1  # bump when option_loglikelihoods or pick changes what it returns


def model_identity(base_fingerprint: str, adapter: Path | None, quantized: bool) -> str:
    parts = [base_fingerprint, "nf4" if quantized else "dense"]
    if adapter is not None:
        parts += [file_sha256(adapter / CONFIG_FILE), file_sha256(adapter / WEIGHTS_FILE)]
    return hashlib.sha256("/".join(parts).encode()).hexdigest()


class ChoiceCache:
    def __init__(self, root: Path):
        self.root = root

    def key(self, identity: str, choice_set: ChoiceSet, max_seq_len: int) -> str:
        described = [SCORING_VERSION, identity, choice_set.source.sha256, choice_set.source.prompt, max_seq_len,
                     [item.line for item in choice_set.items]]
        return hashlib.sha256(json.dumps(described).encode()).hexdigest()

    def get(self, key: str) -> tuple[int, ...] | None:
        try:
            return tuple(json.loads((self.root / f"{key}.json").read_text()))
        except (OSError, ValueError):
            return None

    def put(self, key: str, chosen: tuple[int, ...]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so a reader never sees half a file, whoever writes at the same time.
        handle, staging = tempfile.mkstemp(dir=self.root, suffix=".tmp")
        with os.fdopen(handle, "w") as f:
            json.dump(list(chosen), f)
        os.replace(staging, self.root / f"{key}.json")
