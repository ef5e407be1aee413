"""A transformers checkpoint's safetensors, read one tensor at a time and written one shard at a time.

Both directions keep memory near one tensor (reading) or one shard (writing) whatever the model's
size, so a 7B checkpoint can be rewritten on a host with far less RAM than two copies of it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .base_checkpoint import BaseModelError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

log = logging.getLogger("cartridge.checkpoint")


class CheckpointTensors:
    """The named tensors of a checkpoint directory: one model.safetensors, or the shards its index lists."""

    def __init__(self, directory: Path):
        index = directory / INDEX_FILE
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
            self._file_of = {name: directory / file for name, file in files.items()}
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(directory / SINGLE_FILE, framework="pt") as f:
                self._file_of = {name: directory / SINGLE_FILE for name in f.keys()}
        else:
            raise BaseModelError(f"{directory} holds no {SINGLE_FILE} or {INDEX_FILE} "
                                 f"(pickled checkpoints are never loaded: they can run code)")

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor's shape and dtype, as meta tensors in checkpoint order; no weight is read."""
        specs: dict[str, torch.Tensor] = {}
        for path in dict.fromkeys(self._file_of.values()):
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    if name in self._file_of:
                        specs[name] = f.get_tensor(name).to("meta")
        return specs

    def get(self, name: str) -> torch.Tensor:
        # safe_open maps the whole file and every page read stays resident until it is closed;
        # opening per tensor keeps RSS near one tensor instead of growing to the file's size.
        with safe_open(self._file_of[name], framework="pt") as f:
            return f.get_tensor(name)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Which output tensors go to which shard file, named the way transformers names them."""
    files: dict[str, list[str]]
    total_bytes: int


def plan_shards(specs: Mapping[str, torch.Tensor], max_shard_size: int | str) -> ShardPlan:
    """Shards for tensors of these shapes and dtypes (meta tensors will do), none over `max_shard_size`
    ("2GB", "500MB" or bytes) unless a single tensor is larger. ValueError for a size it cannot read."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(dict(specs), max_shard_size=max_shard_size)
    # One layout whatever the size: a model that fits one shard still gets an index, so every
    # output is found the same way (transformers and our server both read the index first).
    files = split.filename_to_tensors if split.is_sharded else {"model-00001-of-00001.safetensors": list(specs)}
    return ShardPlan(files, split.metadata["total_size"])


def write_shards(directory: Path, plan: ShardPlan, produce: Callable[[str], torch.Tensor],
                 metadata: Mapping[str, str]) -> None:
    """Writes `produce(name)` for every tensor of `plan` into its shard, and the index; `metadata` goes
    into every shard's header and the index. Only one shard's tensors are held at a time."""
    for number, (filename, names) in enumerate(plan.files.items(), start=1):
        shard = {name: produce(name).contiguous() for name in names}
        save_file(shard, directory / filename, metadata={"format": "pt", **metadata})
        log.info("wrote %s (%d/%d)", filename, number, len(plan.files))
        del shard  # now, or the next shard would be built while this one is still held
    weight_map = {name: filename for filename, names in plan.files.items() for name in names}
    index = {"metadata": {"total_size": plan.total_bytes, **metadata}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
