"""The optional packages a run needs, checked before anything is loaded.

A missing one then fails the command in a second, instead of after training, with the adapter
written and no report (the plot is drawn last).
"""
from __future__ import annotations

import importlib.util
from typing import Mapping

from .train.config import ConfigError, TrainConfig

_MODELS = {"transformers": "models and tokenizers", "peft": "LoRA layers", "safetensors": "adapter files",
           "tqdm": "progress bars"}
_NF4 = {"bitsandbytes": "NF4 quantization and 8-bit optimizers"}


def require(needed: Mapping[str, str], command: str, extra: str = "engine") -> None:
    """Raises ConfigError naming every package of `needed` (import name -> what it is for) that is missing,
    and the package extra that installs them."""
    missing = [f"{name} (for {purpose})" for name, purpose in needed.items() if not _importable(name)]
    if missing:
        raise ConfigError(f"{command} needs {', '.join(missing)}, not installed here: "
                          f"pip install 'cartridge-lora[{extra}]'")


def for_training(config: TrainConfig) -> dict[str, str]:
    nf4 = _NF4 if config.quantized or config.optimizer == "paged_adamw_8bit" else {}
    return {**_MODELS, **nf4, "matplotlib": "the loss plot, loss_curves.png"}


def for_cuda_training(config: TrainConfig) -> dict[str, str]:
    """What a run needs beyond for_training once it is known to run on CUDA (extra train-gpu)."""
    return {"liger_kernel": "the fused loss (fused_loss)"} if config.fused_loss else {}


def for_eval(quantized: bool) -> dict[str, str]:
    return {**_MODELS, **(_NF4 if quantized else {})}


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules, i.e. blocked
        return False
