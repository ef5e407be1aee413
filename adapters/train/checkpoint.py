"""Training checkpoints for --resume: LoRA weights, optimizer, schedule and loop state, with no pickle.

Tensors go to safetensors and everything else to JSON, so opening a checkpoint can never run code,
the same promise the adapter files make. A new checkpoint replaces the old one only once complete.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import TrainConfig
from .loop import Trainer, TrainState

DIRECTORY = "checkpoint"
_STATE = "trainer_state.json"
_WEIGHTS = "adapter_weights.safetensors"
_BEST = "best_adapter_weights.safetensors"
_OPTIMIZER = "optimizer.safetensors"


class CheckpointError(ValueError):
    """The checkpoint cannot be resumed from; the message says why."""


@dataclass(frozen=True, slots=True)
class RunIdentity:
    """What a resumed run must share with its checkpoint: data, base, adapter shape and batch order.
    Settings such as max_steps or learning_rate may change on resume; these may not."""
    data_fingerprint: str
    validation_fingerprint: str
    base_fingerprint: str
    method: str
    r: int
    lora_alpha: float
    target_modules: list[str]
    use_rslora: bool
    seed: int
    batch_size: int
    gradient_accumulation: int
    max_seq_len: int
    # Fields added later carry a default: a checkpoint written before them was made with that value.
    packing: bool = False

    @classmethod
    def of(cls, config: TrainConfig, data_fingerprint: str, validation_fingerprint: str,
           base_fingerprint: str) -> "RunIdentity":
        return cls(data_fingerprint, validation_fingerprint, base_fingerprint, config.method, config.r,
                   config.lora_alpha, list(config.target_modules), config.use_rslora, config.seed,
                   config.batch_size, config.gradient_accumulation, config.max_seq_len, config.packing)


def save(output: Path, trainer: Trainer, state: TrainState, identity: RunIdentity) -> None:
    staging = output / f".{DIRECTORY}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(trainer.lora_weights(), staging / _WEIGHTS)
    if trainer.best_weights is not None:
        save_file(trainer.best_weights, staging / _BEST)
    tensors, rest = _split_optimizer_state(trainer.optimizer.state_dict())
    save_file(tensors, staging / _OPTIMIZER)
    (staging / _STATE).write_text(json.dumps({
        "identity": asdict(identity), "state": asdict(state), "optimizer": rest,
        "scheduler": trainer.scheduler.state_dict()}, indent=1))
    final, old = output / DIRECTORY, output / f".{DIRECTORY}.old"
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def exists(output: Path) -> bool:
    return (output / DIRECTORY / _STATE).is_file()


def restore(output: Path, trainer: Trainer, identity: RunIdentity) -> TrainState:
    """Loads the checkpoint into `trainer` and returns the loop state, after checking `identity` matches."""
    directory = output / DIRECTORY
    saved = json.loads((directory / _STATE).read_text())
    earlier = {spec.name: spec.default for spec in fields(RunIdentity) if spec.default is not MISSING}
    for key, value in asdict(identity).items():
        was = saved["identity"].get(key, earlier.get(key))
        if was != value:
            raise CheckpointError(
                f"cannot resume: {key} was {was!r} in {directory}, now it is {value!r}; "
                f"use the same value or a new output directory")
    trainer.load_lora_weights(load_file(directory / _WEIGHTS))
    if (directory / _BEST).is_file():
        trainer.best_weights = load_file(directory / _BEST)
    trainer.optimizer.load_state_dict(_join_optimizer_state(load_file(directory / _OPTIMIZER), saved["optimizer"]))
    trainer.scheduler.load_state_dict(saved["scheduler"])
    state = TrainState(**saved["state"])
    state.train_losses = [tuple(point) for point in state.train_losses]
    state.val_losses = [tuple(point) for point in state.val_losses]
    return state


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors keyed "param/slot", the JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for param, slots in state_dict["state"].items():
        for slot, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{param}/{slot}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(param), {})[slot] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {int(param): dict(slots) for param, slots in rest["scalars"].items()}
    for key, tensor in tensors.items():
        param, slot = key.split("/", 1)
        state.setdefault(int(param), {})[slot] = tensor
    return {"state": state, "param_groups": rest["param_groups"]}
