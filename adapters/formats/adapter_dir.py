"""peft's LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`), read and checked.

Only what batched serving and merging can honour is accepted: plain LoRA on the seven Llama
projections, with peft's per-module ranks and alphas (`rank_pattern`, `alpha_pattern`) served
exactly. Anything else (pickled weights, DoRA, modules_to_save, ranks the tensors contradict) is
refused with a message that names the field, before a single tensor reaches the caller.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load as load_safetensors

from .projections import PROJECTIONS

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_WEIGHTS_FILE = "adapter_model.bin"

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


class AdapterFormatError(ValueError):
    """The directory is not an adapter we can serve or merge; the message says which part and why."""


@dataclass(frozen=True, slots=True)
class LoraConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    use_rslora: bool
    base_model_name_or_path: str | None
    # peft's per-module overrides of r and lora_alpha, in the file's order: peft takes the first
    # pattern that matches a module's name, so order is part of the meaning.
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()

    def rank_of(self, layer: int, projection: str) -> int:
        return _first_match(self.rank_pattern, layer, projection, self.r)

    def scaling_of(self, layer: int, projection: str) -> float:
        """peft's scaling of one module: its own alpha over its own rank (rsLoRA: its square root)."""
        r = self.rank_of(layer, projection)
        alpha = _first_match(self.alpha_pattern, layer, projection, self.lora_alpha)
        # rsLoRA (Kalajdzievski 2023) keeps the update's scale stable as r grows.
        return alpha / (math.sqrt(r) if self.use_rslora else r)


def module_name(layer: int, projection: str) -> str:
    """The module's name inside a transformers Llama, which peft matches its patterns against."""
    return f"model.layers.{layer}.{PROJECTIONS[projection]}.{projection}"


def _first_match(patterns: tuple[tuple[str, float], ...], layer: int, projection: str, default):
    name = module_name(layer, projection)
    for pattern, value in patterns:
        # The same test as peft's get_pattern_key: the pattern matches a dotted suffix of the name.
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One adapter's A and B per (layer, projection): A is [r, in], B is [out, r], as peft stores them."""
    path: Path
    config: LoraConfig
    a: Mapping[tuple[int, str], torch.Tensor]
    b: Mapping[tuple[int, str], torch.Tensor]

    @property
    def size_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))

    def delta(self, layer: int, projection: str) -> torch.Tensor | None:
        """scaling * B @ A, the [out, in] update of one weight, in float32; None where not targeted."""
        if (layer, projection) not in self.a:
            return None
        a, b = self.a[(layer, projection)].float(), self.b[(layer, projection)].float()
        return (b @ a) * self.config.scaling_of(layer, projection)


@dataclass(frozen=True, slots=True)
class BaseShape:
    """What an adapter is checked against: the base's layer count and each projection's [out, in]."""
    num_layers: int
    projections: Mapping[str, tuple[int, int]]

    @classmethod
    def from_config(cls, config) -> "BaseShape":
        """From a transformers LlamaConfig (or anything with the same fields)."""
        hidden, inter = config.hidden_size, config.intermediate_size
        head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
        q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return cls(config.num_hidden_layers, {
            "q_proj": (q_out, hidden), "k_proj": (kv_out, hidden), "v_proj": (kv_out, hidden),
            "o_proj": (hidden, q_out), "gate_proj": (inter, hidden), "up_proj": (inter, hidden),
            "down_proj": (hidden, inter),
        })


def read_config(path: str | Path) -> LoraConfig:
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterFormatError(f"adapter path {str(path)!r} is not a directory")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise AdapterFormatError(f"adapter path {str(path)!r} has no {CONFIG_FILE}")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterFormatError(f"{config_file}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"{config_file}: expected a JSON object")
    return _parse_config(raw, config_file)


def _parse_config(raw: dict, where: Path) -> LoraConfig:
    if raw.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(f"{where}: peft_type is {raw.get('peft_type')!r}; only LORA adapters are served")
    for field, meaning in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (full copies of layers)")):
        if raw.get(field):
            raise AdapterFormatError(f"{where}: {field} is set; {meaning} cannot be batched with other adapters")
    if raw.get("lora_bias") or raw.get("bias", "none") != "none":
        raise AdapterFormatError(f"{where}: bias is {raw.get('bias')!r}; only bias='none' adapters are served")
    r = raw.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(f"{where}: r must be a positive integer, got {r!r}")
    alpha = raw.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise AdapterFormatError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        targets = [name for name in PROJECTIONS if re.fullmatch(targets, name) or targets == name]
    if not targets:
        raise AdapterFormatError(f"{where}: target_modules is empty or missing")
    short = {t.rsplit(".", 1)[-1] for t in targets}
    unknown = sorted(short - PROJECTIONS.keys())
    if unknown:
        raise AdapterFormatError(
            f"{where}: target_modules {unknown} are not Llama projections (expected some of {list(PROJECTIONS)})")
    short = [name for name in PROJECTIONS if name in short]
    return LoraConfig(r=r, lora_alpha=float(alpha), target_modules=tuple(short),
                      use_rslora=bool(raw.get("use_rslora", False)),
                      base_model_name_or_path=raw.get("base_model_name_or_path"),
                      rank_pattern=_patterns(raw, "rank_pattern", where, int),
                      alpha_pattern=_patterns(raw, "alpha_pattern", where, float))


def _patterns(raw: dict, field: str, where: Path, kind: type) -> tuple[tuple[str, float], ...]:
    patterns = raw.get(field) or {}
    if not isinstance(patterns, dict):
        raise AdapterFormatError(f"{where}: {field} must be an object of module pattern -> value")
    checked = []
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as err:
            raise AdapterFormatError(f"{where}: {field} key {pattern!r} is not a valid pattern ({err})") from None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or value <= 0 or (kind is int and value != int(value)):
            raise AdapterFormatError(f"{where}: {field}[{pattern!r}] must be a positive "
                                     f"{'integer' if kind is int else 'number'}, got {value!r}")
        checked.append((pattern, kind(value)))
    return tuple(checked)


def read_adapter(path: str | Path, base: BaseShape | None = None) -> LoraWeights:
    """Reads and checks a whole adapter; with `base`, also that every shape fits that base."""
    directory = Path(path)
    config = read_config(directory)
    weights_file = directory / WEIGHTS_FILE
    if not weights_file.is_file():
        if (directory / PICKLED_WEIGHTS_FILE).exists():
            raise AdapterFormatError(
                f"{directory} holds only {PICKLED_WEIGHTS_FILE}, a pickle, which is never loaded because it can run "
                f"code; re-save the adapter with safetensors (peft: save_pretrained(..., safe_serialization=True))")
        raise AdapterFormatError(f"adapter path {str(path)!r} has no {WEIGHTS_FILE}")
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    try:
        # Parsed from bytes, not through safe_open: its get_tensor keeps a little host memory per tensor
        # (safetensors 0.8), which grew a server's RSS with every adapter registered and dropped.
        tensors = load_safetensors(weights_file.read_bytes())
        for key in sorted(tensors):   # the order safe_open listed them in, so errors name the same module
            tensor = tensors[key]
            match = _KEY.search(key)
            if match is None:
                raise AdapterFormatError(f"{weights_file}: tensor {key!r} is not a LoRA A/B of a Llama projection")
            layer, block, projection, which = int(match[1]), match[2], match[3], match[4]
            if PROJECTIONS.get(projection) != block:
                raise AdapterFormatError(f"{weights_file}: tensor {key!r} targets unknown module {block}.{projection}")
            (a if which == "A" else b)[(layer, projection)] = tensor
    except AdapterFormatError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise AdapterFormatError(f"{weights_file}: cannot be read as safetensors ({err})") from None
    _check_pairs(weights_file, config, a, b)
    if base is not None:
        check_fits(LoraWeights(directory, config, a, b), base)
    return LoraWeights(directory, config, a, b)


def _check_pairs(where: Path, config: LoraConfig, a: dict, b: dict) -> None:
    if not a:
        raise AdapterFormatError(f"{where}: holds no LoRA tensors")
    if a.keys() != b.keys():
        missing = sorted(set(a) ^ set(b))[0]
        raise AdapterFormatError(f"{where}: layer {missing[0]} {missing[1]} has lora_A or lora_B but not both")
    for (layer, projection), tensor_a in a.items():
        tensor_b = b[(layer, projection)]
        if tensor_a.dim() != 2 or tensor_b.dim() != 2 or tensor_a.shape[0] != tensor_b.shape[1]:
            raise AdapterFormatError(
                f"{where}: layer {layer} {projection}: lora_A {tuple(tensor_a.shape)} and lora_B "
                f"{tuple(tensor_b.shape)} do not form a rank-r pair")
        if projection not in config.target_modules:
            raise AdapterFormatError(f"{where}: layer {layer} has weights for {projection}, "
                                     f"which target_modules {list(config.target_modules)} does not list")
        # Scaling follows the configured rank, so a config that contradicts its tensors would be
        # served with the wrong scale; peft refuses such an adapter too (size mismatch).
        expected = config.rank_of(layer, projection)
        if tensor_a.shape[0] != expected:
            source = "rank_pattern" if _first_match(config.rank_pattern, layer, projection, None) else "r"
            raise AdapterFormatError(
                f"{where}: layer {layer} {projection} ({module_name(layer, projection)}) has rank "
                f"{tensor_a.shape[0]} in its tensors, but {CONFIG_FILE} gives it rank {expected} ({source}); "
                f"peft would refuse this adapter too")


def check_fits(adapter: LoraWeights, base: BaseShape) -> None:
    """Raises AdapterFormatError unless every A/B pair fits the base's layers and projection shapes."""
    for (layer, projection), tensor_a in adapter.a.items():
        if layer >= base.num_layers:
            raise AdapterFormatError(
                f"{adapter.path}: has weights for layer {layer}, but the base has {base.num_layers} layers")
        out_features, in_features = base.projections[projection]
        tensor_b = adapter.b[(layer, projection)]
        if tensor_a.shape[1] != in_features or tensor_b.shape[0] != out_features:
            raise AdapterFormatError(
                f"{adapter.path}: layer {layer} {projection} maps {tensor_a.shape[1]} -> {tensor_b.shape[0]} features, "
                f"the base's maps {in_features} -> {out_features}: the adapter was made for another base model")
