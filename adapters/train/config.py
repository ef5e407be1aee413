"""`cartridge train` settings: one dataclass, filled from a YAML file and command-line flags, checked here once.

Every field is both a YAML key and a flag (`learning_rate` <-> `--learning-rate`); a flag wins over the file.
Relative paths in the file are relative to the file, so a config can sit beside its data.
"""
from __future__ import annotations

import difflib
import math
import re
import types
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Mapping, get_args, get_origin, get_type_hints

from ..formats.projections import PROJECTIONS

METHODS = ("lora", "qlora")
SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
LEARNING_RATE = 2e-4
# Continuing moves already-trained weights: a smaller step keeps what they hold (and replay guards it too).
CONTINUE_LEARNING_RATE = 1e-4


class ConfigError(ValueError):
    """A setting is missing, unknown or out of range; the message names the key."""


def _setting(default=MISSING, *, help: str, choices: tuple[str, ...] = (), path: bool = False, flag: str = ""):
    # The help text and choices live beside the field so the flags, the YAML checks and the docs
    # cannot drift apart.
    return field(default=default, metadata={"help": help, "choices": choices, "path": path, "flag": flag})


@dataclass(frozen=True, slots=True)
class TrainConfig:
    data: tuple[str, ...] = _setting(help="JSONL training files (instruction, chat or raw text rows)", path=True)
    output: str = _setting("", help="directory for a one-off adapter, its report and checkpoints "
                           "(or give name, to write a version into the store)", path=True)
    name: str | None = _setting(None, help="write the adapter into the store as NAME@vN, the next N (not made live)")
    from_version: str | None = _setting(None, help="continue from NAME (its live version) or NAME@vN in the store: "
                                        "its LoRA weights, r and targets, replaying earlier data", flag="--from")
    store: str | None = _setting(None, help="adapter store directory (default: $CARTRIDGE_STORE, else store/ in "
                                 "the cache directory)", path=True)
    base_model: str | None = _setting(None, help="transformers-format Llama directory; "
                                      "unset: the embedded SmolLM2-135M-Instruct", path=True)
    val_data: tuple[str, ...] = _setting((), help="JSONL validation files (default: hold out val_fraction of data)",
                                         path=True)
    test_data: tuple[str, ...] = _setting((), help="JSONL files held out for the gate: never trained on and "
                                          "never used to choose weights", path=True)
    gate_file: str | None = _setting(None, help="gate limits (YAML), stored with the version for `cartridge gate`",
                                     path=True)
    defaults: str | None = _setting(None, help="request defaults (a cartridge.json: response_format, temperature, "
                                    "...) written into the adapter beside its weights", path=True)
    val_fraction: float = _setting(0.1, help="share of data rows held out for validation when val_data is empty")
    method: str = _setting("lora", help="lora: dense base; qlora: NF4 base, quantized as the server does",
                           choices=METHODS)
    r: int = _setting(16, help="LoRA rank")
    lora_alpha: float = _setting(32.0, help="LoRA alpha; scaling is alpha / r (alpha / sqrt(r) with rsLoRA)")
    lora_dropout: float = _setting(0.05, help="dropout on the LoRA input during training")
    target_modules: tuple[str, ...] = _setting(tuple(PROJECTIONS), help="projections that get a LoRA")
    use_rslora: bool = _setting(False, help="rank-stabilised scaling alpha / sqrt(r)")
    learning_rate: float | None = _setting(None, help=f"peak learning rate (default {LEARNING_RATE:g}; "
                                           f"{CONTINUE_LEARNING_RATE:g} when continuing with from_version)")
    lr_scheduler: str = _setting("cosine", help="decay after warm-up", choices=SCHEDULERS)
    warmup_ratio: float = _setting(0.05, help="share of the steps spent warming the learning rate up from 0")
    epochs: int = _setting(1, help="passes over the training rows (ignored when max_steps is set)")
    max_steps: int = _setting(0, help="optimizer steps to run; 0 = as many as `epochs` takes")
    batch_size: int = _setting(4, help="examples per micro-batch")
    gradient_accumulation: int = _setting(1, help="micro-batches per optimizer step")
    group_by_length: bool = _setting(True, help="put rows of like length in a micro-batch, so less of it is padding "
                                     "(without packing)")
    packing: bool = _setting(False, help="lay examples end to end in rows of max_seq_len tokens, each attending "
                             "only to itself, so a micro-batch is batch_size such rows with almost no padding")
    weight_decay: float = _setting(0.0, help="AdamW weight decay on the LoRA weights")
    max_grad_norm: float = _setting(1.0, help="gradient clipping norm; 0 = no clipping")
    max_seq_len: int = _setting(512, help="tokens per example; longer chat rows are rejected, longer text is split")
    seed: int = _setting(0, help="seed for LoRA initialisation, the validation split and the data order")
    gradient_checkpointing: bool = _setting(False, help="recompute activations in the backward pass to save memory")
    offload_activations: bool = _setting(False, help="with gradient_checkpointing: keep each layer's saved input in "
                                         "host memory until the backward pass, copied out while the GPU computes")
    fused_loss: bool = _setting(False, help="compute the loss from the answer tokens' hidden states alone; on CUDA "
                                "through Liger Kernel's fused linear cross-entropy, so no logits are made "
                                "(pip install 'cartridge-lora[train-gpu]')")
    optimizer: str = _setting("adamw", help="adamw (torch) or paged_adamw_8bit (bitsandbytes, CUDA only)",
                              choices=OPTIMIZERS)
    eval_every: int = _setting(50, help="optimizer steps between validation passes (and checkpoints)")
    early_stopping_patience: int = _setting(0, help="validation passes without improvement before stopping, keeping "
                                            "the weights of the best validation loss; 0 = never stop early and keep "
                                            "the last step's weights")
    early_stopping_min_delta: float = _setting(0.0, help="how much lower a validation loss must be to count")
    max_rejected_fraction: float = _setting(0.1, help="share of bad rows tolerated before the run stops")
    general_eval_tokens: int = _setting(4096, help="tokens of general text (Python's own docstrings) used "
                                        "to measure forgetting")
    recall_items: int = _setting(64, help="training rows whose greedy answer is checked after training, to report "
                                 "recall of what was trained; 0 = skip")
    replay_fraction: float = _setting(0.5, help="with from_version: share of the earlier versions' training rows "
                                      "mixed into the new data")
    general_replay_fraction: float = _setting(0.05, help="with from_version: general text (Python docstrings other "
                                              "than those that measure forgetting) as a share of the training mix")
    device: str = _setting("auto", help="auto, cpu, cuda or cuda:N")
    resume: bool = _setting(False, help="continue from the checkpoint in `output`")

    def __post_init__(self) -> None:
        _check(bool(self.data), "data", "at least one JSONL file is needed")
        _check(bool(self.output) or bool(self.name), "output",
               "an output directory is needed, or a name to write a version into the store")
        _check(not (self.output and self.name), "output", f"give output {self.output!r} or name {self.name!r}, not both")
        _check(not (self.resume and self.name), "resume", "resumes a run in an output directory; not with name")
        _check(not (self.from_version and self.name and self.from_version.split("@")[0] != self.name),
               "from_version", f"{self.from_version!r} is not a version of {self.name!r}; a name continues itself")
        if self.learning_rate is None:
            # Frozen: the resolved rate is written once here, so the report and the optimizer see the same value.
            object.__setattr__(self, "learning_rate", CONTINUE_LEARNING_RATE if self.from_version else LEARNING_RATE)
        _check(0 < self.val_fraction < 1, "val_fraction", f"must be between 0 and 1, got {self.val_fraction}")
        _check(self.r > 0, "r", f"must be positive, got {self.r}")
        _check(self.lora_alpha > 0, "lora_alpha", f"must be positive, got {self.lora_alpha}")
        _check(0 <= self.lora_dropout < 1, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        unknown = [m for m in self.target_modules if m not in PROJECTIONS]
        _check(bool(self.target_modules) and not unknown, "target_modules",
               f"{unknown or 'nothing'} given; choose among {list(PROJECTIONS)}")
        _check(0 < self.learning_rate < 1, "learning_rate", f"must be in (0, 1), got {self.learning_rate}")
        _check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _check(0 <= self.replay_fraction <= 1, "replay_fraction", f"must be in [0, 1], got {self.replay_fraction}")
        # A share of the whole mix: at 1 there would be no room left for the new data.
        _check(0 <= self.general_replay_fraction < 1, "general_replay_fraction",
               f"must be in [0, 1), got {self.general_replay_fraction}")
        _check(self.recall_items >= 0, "recall_items", f"must not be negative, got {self.recall_items}")
        for key in ("epochs", "batch_size", "gradient_accumulation", "max_seq_len", "eval_every",
                    "general_eval_tokens"):
            _check(getattr(self, key) > 0, key, f"must be positive, got {getattr(self, key)}")
        for key in ("max_steps", "weight_decay", "max_grad_norm", "early_stopping_patience",
                    "early_stopping_min_delta"):
            _check(getattr(self, key) >= 0, key, f"must not be negative, got {getattr(self, key)}")
        _check(self.gradient_checkpointing or not self.offload_activations, "offload_activations",
               "moves what gradient checkpointing saves; set gradient_checkpointing too")
        _check(0 <= self.max_rejected_fraction <= 1, "max_rejected_fraction",
               f"must be between 0 and 1, got {self.max_rejected_fraction}")
        _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None, "device",
               f"expected auto, cpu, cuda or cuda:N, got {self.device!r}")
        for spec in fields(self):
            choices = spec.metadata["choices"]
            _check(not choices or getattr(self, spec.name) in choices, spec.name,
                   f"expected one of {list(choices)}, got {getattr(self, spec.name)!r}")

    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def stored_settings(self) -> dict:
        """Every hyperparameter that shaped the run, as written to the report (lists for tuples, so it reads
        back from JSON). epochs and val_fraction are left out when max_steps and val_data overrode them."""
        unused = {"epochs"} if self.max_steps else set()
        unused |= {"val_fraction"} if self.val_data else set()
        return {spec.name: list(value) if isinstance(value := getattr(self, spec.name), tuple) else value
                for spec in fields(self) if spec.name not in unused}


def _check(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}")


def setting_specs() -> list[tuple[str, type, object, Mapping]]:
    """(name, type, default, metadata) of every setting, for building the command-line flags."""
    hints = get_type_hints(TrainConfig)
    return [(spec.name, hints[spec.name], spec.default, spec.metadata) for spec in fields(TrainConfig)]


def load_train_config(config_file: str | Path | None, flags: Mapping[str, object]) -> TrainConfig:
    """The settings from `config_file` (YAML) overridden by `flags` (only those the user gave)."""
    values: dict[str, object] = {}
    if config_file is not None:
        values.update(_read_yaml(Path(config_file)))
    values.update({key: _resolve_paths(key, value, Path.cwd()) for key, value in flags.items()})
    missing = [spec.name for spec in fields(TrainConfig) if spec.default is MISSING and spec.name not in values]
    if missing:
        raise ConfigError(f"{missing[0]}: required; set it in the config file or with --{missing[0].replace('_', '-')}")
    hints = get_type_hints(TrainConfig)
    return TrainConfig(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _read_yaml(path: Path) -> dict[str, object]:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r}: not valid YAML ({err})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping of settings, got {type(raw).__name__}")
    known = [spec.name for spec in fields(TrainConfig)]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known settings: {', '.join(known)}"
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
    return {key: _resolve_paths(key, value, path.parent) for key, value in raw.items()}


def _resolve_paths(key: str, value: object, relative_to: Path) -> object:
    is_path = next(spec.metadata["path"] for spec in fields(TrainConfig) if spec.name == key)
    if not is_path or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [str(relative_to / str(item)) for item in value]
    return str(relative_to / str(value))


def _coerce(key: str, value: object, kind: type) -> object:
    """`value` as the field's type, or a ConfigError that names the key and what was expected."""
    optional = get_origin(kind) is types.UnionType and type(None) in get_args(kind)
    if optional:
        if value is None:
            return None
        kind = next(arg for arg in get_args(kind) if arg is not type(None))
    if get_origin(kind) is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return tuple(items)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        return value
    if kind is float:
        # PyYAML reads `1e-4` (no dot) as a string, so numbers written that way are accepted here.
        try:
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value
