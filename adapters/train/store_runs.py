"""`cartridge train --name/--from`: where a stored run starts from, and how its result becomes `NAME@vN`.

The version holds copies of every data file by role (train, val, test, replay), so later runs can
replay them and the gate can score them however the originals change; the manifest records their
hashes with the base, the settings, the seed and the library versions.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .datasets import Example
from ..formats.adapter_dir import read_config
from .replay import Replay
from ..formats.store_layout import StoredVersion, StoreError, VersionRef, default_store_dir, parse_ref, read_live
from ..store.versions import AdapterStore, VersionDraft
from .config import ConfigError, TrainConfig

_SHAPE = ("r", "lora_alpha", "target_modules", "use_rslora")


def open_store(config: TrainConfig) -> AdapterStore:
    return AdapterStore(Path(config.store) if config.store else default_store_dir())


def resolve(store: AdapterStore, text: str) -> StoredVersion:
    """`legal@v2`, or `legal` for its live version, opened and checked."""
    ref = parse_ref(text)
    if ref.number is None:
        live = read_live(store, ref.name)
        if live is None:
            raise StoreError(f"{ref.name} has no live version; name one, such as {ref.name}@v1")
        ref = VersionRef(ref.name, live.to_version)
    return store.open(ref)


def continue_settings(config: TrainConfig, parent: StoredVersion) -> TrainConfig:
    """`config` with the parent's LoRA shape (the weights carry on, so r and targets cannot change)."""
    saved = read_config(parent.path)
    shape = {"r": saved.r, "lora_alpha": saved.lora_alpha, "target_modules": saved.target_modules,
             "use_rslora": saved.use_rslora}
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for key in _SHAPE:
        # A setting left at its default follows the parent; one set to something else is a contradiction.
        asked = getattr(config, key)
        if asked != defaults[key] and asked != shape[key]:
            raise ConfigError(f"{key}: {parent.ref} has {key} {shape[key]!r}; a continued run keeps it "
                              f"(got {asked!r})")
    return dataclasses.replace(config, **shape)


def commit_version(draft: VersionDraft, config: TrainConfig, report: dict, parent: StoredVersion | None,
                   held_out: list[Example], replay: Replay | None) -> StoredVersion:
    for path in config.data:
        draft.add_data("train", Path(path))
    for path in config.val_data:
        draft.add_data("val", Path(path))
    if not config.val_data:
        draft.add_data_lines("val", "held_out.jsonl", _lines_of(held_out),
                             source=f"{config.val_fraction:.0%} of the data rows, chosen by seed {config.seed}")
    for path in config.test_data:
        draft.add_data("test", Path(path))
    if replay is not None and replay.rows:
        draft.add_data_lines("replay", "replay.jsonl", list(replay.rows),
                             source=", ".join(s["version"] for s in replay.summary["sources"]))
    record = {"base": report["base"], "train_config": report["hyperparameters"], "seed": config.seed,
              "libraries": report["libraries"], "continued": report.get("continued")}
    return draft.commit(parent=parent.number if parent else None, record=record)


def _lines_of(examples: list[Example]) -> list[str]:
    """The JSONL lines the examples were read from, each once, in file order."""
    rows = sorted({example.row for example in examples})
    files = {path: Path(path).read_text().splitlines() for path, _ in rows}
    return [files[path][line - 1] for path, line in rows]
