"""One `cartridge train` run, from checked settings to an adapter directory with its report.

Everything that can fail on the user's input (data, base, output directory, checkpoint) is checked
before the first training step, and nothing is written until the data has been found usable.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from . import checkpoint
from ..dependencies import for_cuda_training, require
from .datasets import Dataset, Example, read_dataset, split_validation
from ..eval.evaluate import PACE, Comparison, Measurement, about, compare, exact_match, measure_loss
from ..formats.adapter_dir import CONFIG_FILE, WEIGHTS_FILE, AdapterFormatError, BaseShape, read_adapter
from ..formats.cartridge_json import DEFAULTS_FILE, read_defaults_file
from ..formats.base_checkpoint import resolve_base
from ..formats.base_fingerprint import base_fingerprint
from ..formats.file_modes import follow_umask
from ..general_text import general_text
from ..lora_model import load_base, pick_device, with_continued_lora, with_new_lora
from .replay import replay_for
from .report import write_training_report
from .config import ConfigError, TrainConfig
from .store_runs import commit_version, continue_settings, open_store, resolve
from .loop import Trainer, TrainState, fit, steps_per_epoch, total_steps


def run_training(config: TrainConfig) -> tuple[dict, str]:
    """Trains and writes the adapter, training_report.json and the loss plot into config.output, or into the
    store as the next version of config.name; returns the report and where it went."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    device = pick_device(config.device)
    if config.optimizer == "paged_adamw_8bit" and device.type != "cuda":
        raise ConfigError("optimizer: paged_adamw_8bit pages through CUDA memory; use adamw on the CPU")
    if device.type == "cuda":
        require(for_cuda_training(config), "cartridge train on CUDA", extra="train-gpu")
    store = open_store(config) if config.name or config.from_version else None
    parent = resolve(store, config.from_version) if config.from_version else None
    if parent is not None:
        config = continue_settings(config, parent)
        print(f"continuing from {parent.ref}: r={config.r}, lora_alpha={config.lora_alpha:g}, "
              f"targets {','.join(config.target_modules)}, learning rate {config.learning_rate:g}", flush=True)
    if config.output:
        _check_output(Path(config.output), config.resume)
    defaults = _defaults_file(config, parent)
    base_dir = resolve_base(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = read_dataset(config.data, tokenizer, config.max_seq_len, config.max_rejected_fraction)
    validation = (read_dataset(config.val_data, tokenizer, config.max_seq_len, config.max_rejected_fraction)
                  if config.val_data else None)
    train, val = ((list(data.examples), list(validation.examples)) if validation is not None
                  else split_validation(data.examples, config.val_fraction, config.seed))
    _say_rejected(data, validation)
    base_hash = base_fingerprint(base_dir)
    if parent is not None and parent.manifest["base"]["fingerprint"] != base_hash:
        raise ConfigError(f"base_model: {parent.ref} was trained on another base ({parent.manifest['base']['path']}, "
                          f"fingerprint {parent.manifest['base']['fingerprint'][:12]}); continue on that base")
    replay = (replay_for(str(parent.ref), [parent, *store.lineage(parent)], len(train), config, tokenizer)
              if parent else None)
    mixed = [*train, *replay.examples] if replay else train
    steps = total_steps(mixed, config)
    print(f"data: {data.rows_used} rows used, {data.rows_rejected} rejected; {len(train)} training and "
          f"{len(val)} validation examples" + (f", {len(mixed) - len(train)} replayed" if replay else "") +
          f"; {steps} steps ({steps / steps_per_epoch(mixed, config):.1f} epochs)", flush=True)

    base = load_base(base_dir, config.quantized, device)
    model = with_continued_lora(base, parent.path, config) if parent else with_new_lora(base, config)
    trainer = Trainer(model, config, steps)
    identity = checkpoint.RunIdentity.of(
        config, data.fingerprint, validation.fingerprint if validation else f"split {config.val_fraction}", base_hash)
    state = TrainState()
    if config.resume:
        state = checkpoint.restore(Path(config.output), trainer, identity)
        print(f"resuming from step {state.step} of {steps}", flush=True)
    draft = store.draft(config.name) if config.name else None
    output = draft.path if draft else Path(config.output)
    try:
        output.mkdir(parents=True, exist_ok=True)
        report = _train_and_write(config, output, model, tokenizer, trainer, state, steps, mixed, train, val,
                                  identity, base_dir, data, validation, replay, started, device)
        if defaults is not None:
            shutil.copyfile(defaults, output / DEFAULTS_FILE)
        if draft is None:
            return report, str(output)
        version = commit_version(draft, config, report, parent, val if validation is None else [], replay)
    except BaseException:
        if draft is not None:
            draft.discard()
        raise
    return report, str(version.ref)


def _train_and_write(config, output, model, tokenizer, trainer, state, steps, mixed, train, val, identity, base_dir,
                     data, validation, replay, started, device) -> dict:
    pad_id = tokenizer.pad_token_id
    validated: dict[int, Measurement] = {}   # step -> the adapter on the validation rows, as fit measured it

    def validation_loss() -> float:
        validated[state.step] = measure_loss(model, val, config.batch_size, pad_id)
        return validated[state.step].loss

    state = fit(trainer, mixed, config, state, steps, pad_id, validation_loss=validation_loss,
                checkpoint=lambda s: checkpoint.save(output, trainer, s, identity))
    # Held-out loss picks weights that generalise, which suits skills; for knowledge it stops before the
    # items are learned (the held-out rows cannot be learned at all). So early stopping, and the best
    # validation weights with it, happen only when asked for.
    kept_step = state.best_step if config.early_stopping_patience else state.step
    if config.early_stopping_patience:
        trainer.load_lora_weights(trainer.best_weights)
    print(f"stopped: {state.stop_reason}; keeping the adapter of step {kept_step} "
          f"(best validation loss {state.best_val_loss:.4f} at step {state.best_step})", flush=True)

    recall = _recall(model, tokenizer, train, config)
    general = general_text(tokenizer, config.general_eval_tokens)
    # The kept weights were measured on the validation rows when fit validated them: the same pass, not run again.
    kept_figures = validated.get(kept_step)
    passes = [val, general.examples, general.examples] + ([] if kept_figures else [val])
    expected = [PACE.expected_s(examples, config.batch_size) for examples in passes]
    print(f"measuring forgetting: {general.num_tokens} tokens of general text (base and adapter) and {len(val)} "
          f"validation rows (base{'' if kept_figures else ' and adapter'}); "
          f"{about(None if None in expected else sum(expected))}", flush=True)
    with model.disable_adapter():
        base_figures = measure_loss(model, val, config.batch_size, pad_id, "validation, base")
    domain_figures = Comparison(base_figures, kept_figures or measure_loss(model, val, config.batch_size, pad_id,
                                                                           "validation, adapter"))
    general_figures = compare(model, tokenizer, general.examples, config.batch_size, with_exact_match=False,
                              label="general text")
    model.save_pretrained(output)
    follow_umask(output / WEIGHTS_FILE)   # safetensors writes it 0600
    read_adapter(output, BaseShape.from_config(model.config))  # the server's own check, before we call it done
    return write_training_report(
        output, config=config, base_dir=base_dir, base_hash=identity.base_fingerprint, train=data,
        validation=validation, num_train=len(mixed), num_val=len(val), state=state, kept_step=kept_step,
        recall=recall, continued=replay.summary if replay else None, domain=domain_figures, general=general,
        general_figures=general_figures, wall_s=time.perf_counter() - started, device=device)


def _recall(model, tokenizer, train: list[Example], config: TrainConfig) -> dict | None:
    """Exact match of the greedy answer on up to recall_items training rows: whether the items were learned."""
    checkable = [example for example in train if example.answer is not None]
    if not checkable or not config.recall_items:
        return None
    chosen = random.Random(f"recall/{config.seed}").sample(checkable, min(config.recall_items, len(checkable)))
    print(f"measuring recall on {len(chosen)} training rows; "
          f"{about(PACE.expected_s(chosen, config.batch_size))}", flush=True)
    return {"items": len(chosen), "exact_match": exact_match(model, tokenizer, chosen, config.batch_size, "recall")}


def _defaults_file(config: TrainConfig, parent) -> Path | None:
    """The cartridge.json to write beside the weights, shape-checked now: config.defaults, else the parent
    version's (a continued cartridge keeps its defaults)."""
    if config.defaults is None:
        inherited = parent.path / DEFAULTS_FILE if parent is not None else None
        return inherited if inherited is not None and inherited.is_file() else None
    try:
        read_defaults_file(Path(config.defaults))
    except AdapterFormatError as err:
        raise ConfigError(f"defaults: {err}") from None
    return Path(config.defaults)


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
