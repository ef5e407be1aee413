"""One `cartridge train` run, from checked settings to an adapter directory with its report.

Everything that can fail on the user's input (data, base, output directory, checkpoint) is checked
before the first training step, and nothing is written until the data has been found usable.
"""
from __future__ import annotations

import time
from pathlib import Path

from . import train_checkpoint as checkpoint
from .datasets import Dataset, read_dataset, split_validation
from .evaluate import compare, measure_loss
from .formats.adapter_dir import CONFIG_FILE, BaseShape, read_adapter
from .formats.base_checkpoint import resolve_base
from .formats.base_fingerprint import base_fingerprint
from .general_text import general_text
from .lora_model import load_base, pick_device, with_new_lora
from .report import write_training_report
from .train_config import ConfigError, TrainConfig
from .trainer import Trainer, TrainState, fit, steps_per_epoch, total_steps


def run_training(config: TrainConfig) -> dict:
    """Trains, writes the adapter, training_report.json and the loss plot into config.output; returns the report."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    device = pick_device(config.device)
    if config.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError("optimizer: paged_adamw_8bit pages through CUDA memory; use adamw on the CPU")
    output = Path(config.output)
    _check_output(output, config.resume)
    base_dir = resolve_base(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = read_dataset(config.data, tokenizer, config.max_seq_len, config.max_rejected_fraction)
    validation = (read_dataset(config.val_data, tokenizer, config.max_seq_len, config.max_rejected_fraction)
                  if config.val_data else None)
    train, val = ((list(data.examples), list(validation.examples)) if validation is not None
                  else split_validation(data.examples, config.val_fraction, config.seed))
    _say_rejected(data, validation)
    steps = total_steps(len(train), config)
    print(f"data: {data.rows_used} rows used, {data.rows_rejected} rejected; {len(train)} training and "
          f"{len(val)} validation examples; {steps} steps ({steps / steps_per_epoch(len(train), config):.1f} epochs)",
          flush=True)

    model = with_new_lora(load_base(base_dir, config.quantized, device), config)
    trainer = Trainer(model, config, steps)
    identity = checkpoint.RunIdentity.of(
        config, data.fingerprint, validation.fingerprint if validation else f"split {config.val_fraction}",
        base_fingerprint(base_dir))
    state = TrainState()
    if config.resume:
        state = checkpoint.restore(output, trainer, identity)
        print(f"resuming from step {state.step} of {steps}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    pad_id = tokenizer.pad_token_id
    state = fit(trainer, train, config, state, steps, pad_id,
                validation_loss=lambda: measure_loss(model, val, config.batch_size, pad_id).loss,
                checkpoint=lambda s: checkpoint.save(output, trainer, s, identity))
    print(f"stopped: {state.stop_reason}; keeping the adapter of step {state.best_step} "
          f"(validation loss {state.best_val_loss:.4f})", flush=True)

    trainer.load_lora_weights(trainer.best_weights)
    print("measuring forgetting: base and adapter on the validation split and on general text", flush=True)
    general = general_text(tokenizer, config.general_eval_tokens)
    domain_figures = compare(model, tokenizer, val, config.batch_size, with_exact_match=False, label="validation")
    general_figures = compare(model, tokenizer, general.examples, config.batch_size, with_exact_match=False,
                              label="general text")
    model.save_pretrained(output)
    read_adapter(output, BaseShape.from_config(model.config))  # the server's own check, before we call it done
    return write_training_report(
        output, config=config, base_dir=base_dir, base_hash=identity.base_fingerprint, train=data,
        validation=validation, num_train=len(train), num_val=len(val), state=state, domain=domain_figures,
        general=general, general_figures=general_figures, wall_s=time.perf_counter() - started, device=device)


def _check_output(output: Path, resume: bool) -> None:
    if resume and not checkpoint.exists(output):
        raise ConfigError(f"resume: {output} holds no checkpoint to resume from")
    if not resume and (checkpoint.exists(output) or (output / CONFIG_FILE).exists()):
        raise ConfigError(f"output: {output} already holds a training run; pass --resume to continue it "
                          f"or choose another directory")


def _say_rejected(*datasets: Dataset | None) -> None:
    for dataset in datasets:
        for row in dataset.rejected if dataset else ():
            print(f"skipped {row}", flush=True)
