"""What a continued run mixes into its new data so the adapter keeps what it knew: a share of every
earlier version's training rows, read back from the store and checked against their manifests, and a
little general text.

Rows an earlier version held out (its validation and test files) are never replayed: they are what
the gate scores that version's domain on, and training on them would hide forgetting.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .datasets import Example, read_dataset
from ..general_text import general_training_text
from ..formats.store_layout import StoredVersion
from .config import TrainConfig


@dataclass(frozen=True, slots=True)
class Replay:
    examples: tuple[Example, ...]   # earlier rows, then general-text windows
    rows: tuple[str, ...]           # the earlier rows as JSONL lines, stored with the new version
    summary: dict                   # for the training report


def replay_for(start: str, lineage: list[StoredVersion], num_new: int, config: TrainConfig, tokenizer) -> Replay:
    """`config.replay_fraction` of the lineage's training rows and general text for `general_replay_fraction`
    of the whole mix, both chosen by `config.seed`."""
    held_out = {line.strip() for version in lineage for held in (*version.data_files("val"),
                                                                   *version.data_files("test"))
                for line in held.path.read_text().splitlines() if line.strip()}
    files = [f for version in lineage for f in version.data_files("train")]
    earlier = read_dataset([str(f.path) for f in files], tokenizer, config.max_seq_len, config.max_rejected_fraction)
    lines = {str(f.path): Path(f.path).read_text().splitlines() for f in files}
    by_row: dict[tuple[str, int], list[Example]] = {}
    for example in earlier.examples:
        if lines[example.row[0]][example.row[1] - 1].strip() not in held_out:
            by_row.setdefault(example.row, []).append(example)
    rows = sorted(by_row)
    chosen = sorted(random.Random(f"replay/{config.seed}").sample(rows, round(config.replay_fraction * len(rows))))
    examples = [example for row in chosen for example in by_row[row]]
    mixed = num_new + len(examples)
    num_general = round(config.general_replay_fraction * mixed / (1 - config.general_replay_fraction))
    general = general_training_text(tokenizer, num_general, config.max_seq_len)
    summary = {
        "from": start, "learning_rate": config.learning_rate,
        "sources": [{"version": f"{v.name}@v{v.number}", "file": str(f.path), "sha256": f.sha256}
                    for v in lineage for f in v.data_files("train")],
        "replay_fraction": config.replay_fraction, "rows_available": len(rows), "rows_replayed": len(chosen),
        "examples_replayed": len(examples), "held_out_rows_excluded": len(held_out),
        "general_text": {"share": config.general_replay_fraction, "windows": len(general.examples),
                         "tokens": general.num_tokens, "source": general.source, "fingerprint": general.fingerprint},
    }
    return Replay((*examples, *general.examples), tuple(lines[f][n - 1] for f, n in chosen), summary)
