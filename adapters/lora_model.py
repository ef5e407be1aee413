"""The base model with a peft LoRA on it, dense or NF4, for training and for evaluation."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from .formats import nf4
from .formats.adapter_dir import BaseShape, read_adapter
from .train.config import ConfigError, TrainConfig
from .train.offload import offload_checkpointed_layers


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but torch sees no CUDA device")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    # bf16 is what the server computes in on CUDA; CPUs without bf16 units emulate it slowly.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(base_dir: Path, quantized: bool, device: torch.device):
    """The base as a transformers model; with `quantized`, NF4 exactly as the server quantizes it."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(device)
    quantization = nf4.bnb_config(dtype) if quantized else None
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype, quantization_config=quantization,
                                                device_map={"": device})


def with_new_lora(base, config: TrainConfig):
    """`base` wrapped by peft with a fresh, trainable LoRA as `config` describes, in train mode."""
    from peft import LoraConfig, get_peft_model

    base = _ready_for_training(base, config)
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), use_rslora=config.use_rslora, bias="none",
                      task_type="CAUSAL_LM")
    with peft_wrapping():
        model = get_peft_model(base, lora)
    # from_pretrained leaves the model in eval mode, where transformers silently skips gradient checkpointing.
    model.train()
    return model


def with_continued_lora(base, adapter_dir: Path, config: TrainConfig):
    """`base` with the trained adapter in `adapter_dir`, checked as the server checks it, trainable again."""
    from peft import PeftModel

    read_adapter(adapter_dir, BaseShape.from_config(base.config))
    torch.manual_seed(config.seed)  # dropout draws
    base = _ready_for_training(base, config)
    with peft_wrapping():
        model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    model.train()
    return model


def _ready_for_training(base, config: TrainConfig):
    from peft import prepare_model_for_kbit_training

    if config.quantized:
        # Casts the norms and embeddings to float32 and readies the NF4 layers for backward (QLoRA's recipe).
        # Checkpointing is turned on below: peft would through transformers' deprecated gradient_checkpointing_enable.
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no grad-requiring inputs, so frozen embeddings stay frozen.
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        if config.offload_activations:
            offload_checkpointed_layers(base)
    return base


def with_saved_lora(base, adapter_dir: Path):
    """`base` with the adapter in `adapter_dir`, after the same checks the server makes when registering it."""
    from peft import PeftModel

    read_adapter(adapter_dir, BaseShape.from_config(base.config))
    with peft_wrapping():
        return PeftModel.from_pretrained(base, adapter_dir).eval()


@contextlib.contextmanager
def peft_wrapping():
    """Around peft wrapping a transformers model: peft 0.21 (the newest) reads the model's
    `is_gradient_checkpointing`, which transformers 5 deprecates for `is_activation_checkpointing`, and
    so warned on every train, gate and merge. Only that warning is silenced, and only here: our own calls
    use the current names."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield
