"""Folding LoRA adapters into a base model: W' = W + sum_i weight_i * scaling_i * B_i @ A_i.

The output is a plain transformers directory that loads without peft. The base is read one tensor
at a time and the output written one shard at a time (formats.checkpoint_shards), into a staging
directory beside the target that is renamed into place only once it is complete and verified.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..formats import nf4
from ..formats.adapter_dir import BaseShape, LoraWeights, read_adapter
from ..formats.base_checkpoint import has_tokenizer, resolve_base
from ..formats.checkpoint_shards import CheckpointTensors, plan_shards, write_shards
from ..formats.file_modes import follow_umask
from ..formats.projections import PROJECTIONS
from .verify import Verification, verify_merge

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WEIGHTS_SOURCES = ("dense", "nf4")
# The dtype the server (on CUDA) and the QLoRA trainer cast to before quantizing: it decides
# which NF4 codes, hence which W, an adapter trained on the quantized base actually saw.
NF4_COMPUTE_DTYPE = torch.bfloat16
# Quantize where the server and the trainer do when this host can: bitsandbytes' CPU and CUDA
# kernels are separate code, and the point of the nf4 source is the very values they computed.
NF4_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Verification holds the model in float32, twice over one after the other (reference, then merged),
# so by default only models below this size pay for it.
VERIFY_BY_DEFAULT_MAX_PARAMS = 1_000_000_000

log = logging.getLogger("cartridge.merge")


class MergeError(ValueError):
    """The merge is refused before anything is written; the message names the problem."""


class VerificationError(RuntimeError):
    """The merged model's logits are further from base + adapters than the tolerance; nothing was written."""


@dataclass(frozen=True, slots=True)
class MergeConfig:
    adapters: tuple[Path, ...]
    out: Path
    weights: tuple[float, ...] = ()        # one per adapter, in order; empty: 1.0 each
    base: str | None = None                # transformers directory; None = the embedded default
    dtype: str = "bf16"                    # of the merged weights: a key of DTYPES
    weights_source: str = "dense"          # W before the fold: "dense" or "nf4" (what the server serves)
    verify: bool | None = None             # None: only below VERIFY_BY_DEFAULT_MAX_PARAMS
    overwrite: bool = False
    max_shard_size: str = "2GB"            # peak memory is about one shard plus a few tensors

    def __post_init__(self) -> None:
        if not self.adapters:
            raise MergeError("give at least one --adapter")
        if self.dtype not in DTYPES:
            raise MergeError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.weights_source not in WEIGHTS_SOURCES:
            raise MergeError(f"--weights-source must be one of {', '.join(WEIGHTS_SOURCES)}, "
                             f"got {self.weights_source!r}")
        if self.weights and len(self.weights) != len(self.adapters):
            raise MergeError(f"{len(self.weights)} --weight for {len(self.adapters)} --adapter: give one weight "
                             f"per adapter, in the same order, or none (1.0 each)")
        if not all(math.isfinite(w) for w in self.weights):
            raise MergeError(f"--weight must be finite numbers, got {list(self.weights)}")

    @property
    def adapter_weights(self) -> tuple[float, ...]:
        return self.weights or (1.0,) * len(self.adapters)


@dataclass(frozen=True, slots=True)
class MergeResult:
    out: Path
    num_shards: int
    num_bytes: int
    metadata: dict[str, str]
    verification: Verification | None


@dataclass(frozen=True, slots=True)
class WeightsSource:
    """W as the merge reads it: the checkpoint's own weights, or what the server computes with under NF4."""
    kind: str
    quantized: frozenset[str]              # the tensors the server keeps in NF4: every projection weight

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if self.kind == "nf4" and name in self.quantized:
            return nf4.round_trip(weight.to(NF4_DEVICE), NF4_COMPUTE_DTYPE).cpu()
        return weight


def merge(config: MergeConfig) -> MergeResult:
    """Refuses (MergeError, AdapterFormatError, BaseModelError) before writing anything, or writes the
    whole merged model to config.out; VerificationError if --verify finds it off (nothing is written)."""
    base_dir = resolve_base(config.base)
    model_config = _read_base_config(base_dir)
    shape = BaseShape.from_config(model_config)
    adapters = [read_adapter(path, shape) for path in config.adapters]
    tensors = CheckpointTensors(base_dir)
    projections = _projection_weights(shape.num_layers)
    _check_targets(adapters, projections, tensors, base_dir)
    _check_out(config.out, config.overwrite, (base_dir, *config.adapters))

    dtype = DTYPES[config.dtype]
    sources = tensors.meta()
    specs = {name: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
             for name, t in sources.items()}
    try:
        plan = plan_shards(specs, config.max_shard_size)
    except ValueError as err:
        raise MergeError(f"--max-shard-size {config.max_shard_size!r}: {err}") from None
    source = WeightsSource(config.weights_source, frozenset(projections))
    weights = config.adapter_weights

    def produce(name: str) -> torch.Tensor:
        weight = source(name, tensors.get(name))
        if name in projections:
            delta = _weighted_delta(adapters, weights, *projections[name])
            if delta is not None:
                weight = delta.add_(weight)      # summed in float32 whatever W's dtype, rounded once below
        return weight.to(specs[name].dtype)

    metadata = _metadata(config, base_dir, adapters)
    verify = config.verify if config.verify is not None else \
        sum(t.numel() for t in sources.values()) <= VERIFY_BY_DEFAULT_MAX_PARAMS
    log.info("merging %d adapter(s) into %s: %s weights, W from %s, %d shard(s)", len(adapters), base_dir,
             config.dtype, config.weights_source, len(plan.files))
    config.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{config.out.name}.merging-", dir=config.out.parent))
    try:
        write_shards(staging, plan, produce, metadata)
        _write_model_files(base_dir, model_config, dtype, staging)
        verification = None
        if verify:
            verification = verify_merge(base_dir, list(zip(config.adapters, weights)), source, staging, dtype)
            if not verification.passed:
                raise VerificationError(f"verification failed: {verification}; the merge was not written")
        follow_umask(staging)      # mkdtemp's 0700 and safetensors' 0600 would keep other users out
        _publish(staging, config.out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)   # gone already once published
    return MergeResult(config.out, len(plan.files), plan.total_bytes, metadata, verification)


def _read_base_config(base_dir: Path):
    from transformers import AutoConfig

    model_config = AutoConfig.from_pretrained(base_dir)
    if getattr(model_config, "quantization_config", None):
        raise MergeError(f"base {base_dir} is a quantized checkpoint; merging needs its dense weights "
                         f"(use --weights-source nf4 to fold into what the server serves)")
    return model_config


def _projection_weights(num_layers: int) -> dict[str, tuple[int, str]]:
    """Checkpoint name of every projection weight -> (layer, projection), as Llama checkpoints name them."""
    return {f"model.layers.{layer}.{block}.{projection}.weight": (layer, projection)
            for layer in range(num_layers) for projection, block in PROJECTIONS.items()}


def _check_targets(adapters: Sequence[LoraWeights], projections: dict[str, tuple[int, str]],
                   tensors: CheckpointTensors, base_dir: Path) -> None:
    names = {where: name for name, where in projections.items()}
    for adapter in adapters:
        for layer, projection in adapter.a:
            if names[(layer, projection)] not in tensors:
                raise MergeError(f"{adapter.path}: targets {names[(layer, projection)]}, which the base {base_dir} "
                                 f"does not have: the adapter was made for another base model")


def _check_out(out: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(f"--out {out} exists and is not empty; pass --overwrite to replace it")
    target = out.resolve()
    for path in inputs:
        if path.resolve() == target or target in path.resolve().parents:
            raise MergeError(f"--out {out} would replace {path}, an input of this merge; choose another directory")


def _weighted_delta(adapters: Sequence[LoraWeights], weights: Sequence[float], layer: int,
                    projection: str) -> torch.Tensor | None:
    """sum_i weight_i * scaling_i * B_i @ A_i in float32, [out, in]; None where no adapter targets it."""
    total = None
    for adapter, weight in zip(adapters, weights):
        delta = adapter.delta(layer, projection)
        if delta is not None:
            total = delta.mul_(weight) if total is None else total.add_(delta, alpha=weight)
    return total


def _metadata(config: MergeConfig, base_dir: Path, adapters: Sequence[LoraWeights]) -> dict[str, str]:
    """What the merge was made from, in every shard's header and the index (safetensors wants strings)."""
    metadata = {"merge.base": str(base_dir), "merge.weights_source": config.weights_source,
                "merge.adapters": json.dumps([
                    {"path": str(a.path.resolve()), "weight": w, "r": a.config.r, "lora_alpha": a.config.lora_alpha,
                     "use_rslora": a.config.use_rslora, "rank_pattern": dict(a.config.rank_pattern),
                     "alpha_pattern": dict(a.config.alpha_pattern)}
                    for a, w in zip(adapters, config.adapter_weights)])}
    if config.weights_source == "nf4":
        metadata["merge.nf4_compute_dtype"] = str(NF4_COMPUTE_DTYPE).removeprefix("torch.")
        metadata["merge.nf4_device"] = NF4_DEVICE
    return metadata


def _write_model_files(base_dir: Path, model_config, dtype: torch.dtype, directory: Path) -> None:
    """config (with the new dtype), generation config and tokenizer, as transformers writes them."""
    from transformers import AutoTokenizer, GenerationConfig

    model_config.dtype = dtype
    model_config.save_pretrained(directory)
    if (base_dir / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(base_dir).save_pretrained(directory)
    else:
        GenerationConfig.from_model_config(model_config).save_pretrained(directory)
    if has_tokenizer(base_dir):
        AutoTokenizer.from_pretrained(base_dir).save_pretrained(directory)
    else:
        log.warning("base %s has no tokenizer; the merged model has none either", base_dir)


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        # rename() cannot replace a non-empty directory: move the old one aside, then drop it.
        retired = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired)
    else:
        staging.rename(out)
