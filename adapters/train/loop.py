"""The training loop: optimizer steps over micro-batches, validation at intervals, early stopping.

A hand-written loop rather than transformers' Trainer: what it would give us (gradient accumulation,
a schedule, clipping) is a few lines here, while its checkpoints pickle optimizer and RNG state and its
logging, callbacks and argument set would stand between the user and our one config and report.
The heavy parts are still transformers', peft's and bitsandbytes': the model, the LoRA layers, the
NF4 kernels, the loss, the schedules and the 8-bit optimizer.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from .answer_loss import step_loss
from .datasets import Batch, Example, collate
from .config import TrainConfig
from .packing import collate_packed, pack

# Our names for transformers' schedules: "constant" still warms up first.
_SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


@dataclass(slots=True)
class TrainState:
    """Where a run stands; a checkpoint stores it so --resume carries on from the same step."""
    step: int = 0
    tokens_trained: int = 0
    training_s: float = 0.0
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    best_val_loss: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0
    stop_reason: str = ""


class Trainer:
    """One LoRA model's optimizer and learning-rate schedule; `step` is one optimizer step."""

    def __init__(self, model, config: TrainConfig, total_steps: int):
        from transformers import get_scheduler

        self.model = model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = _optimizer(self.parameters, config)
        self.scheduler = get_scheduler(_SCHEDULES[config.lr_scheduler], self.optimizer,
                                       num_warmup_steps=round(config.warmup_ratio * total_steps),
                                       num_training_steps=total_steps)
        self.max_grad_norm = config.max_grad_norm
        self.loss = step_loss(config.fused_loss, model.device)
        self.best_weights: dict[str, torch.Tensor] | None = None

    def step(self, micro_batches: Sequence[Batch]) -> float:
        """Forward and backward over every micro-batch, then one update; returns the loss per answer token."""
        # Dividing each micro-batch's summed loss by the whole step's answer tokens makes accumulation
        # give the same gradient as one big batch, however the answer lengths fall.
        num_items = sum(batch.num_answer_tokens for batch in micro_batches)
        total = torch.zeros((), device=self.model.device)
        for batch in micro_batches:
            batch = batch.to(self.model.device)
            loss = self.loss(self.model, batch, num_items)
            loss.backward()
            total += loss.detach()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total.item()

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable weights, keyed by parameter name.

        Read from the parameters, not through model.state_dict(): on the CPU, bitsandbytes' NF4 layers
        unpack and later repack their weights on every state_dict() call, which changes the base's outputs."""
        return {name: param.detach().to("cpu", copy=True) for name, param in self.model.named_parameters()
                if param.requires_grad}

    def load_lora_weights(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(weights[name])

    def keep_best(self) -> None:
        self.best_weights = self.lora_weights()


def _optimizer(parameters: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


def steps_per_epoch(examples: Sequence[Example], config: TrainConfig) -> float:
    """Optimizer steps in an epoch (the first's, when packing makes epochs differ by a row or two)."""
    lengths = [example.num_tokens for example in examples]
    plan = _epoch_plan(lengths, config, random.Random(f"{config.seed}/0"))
    return len(plan) / config.gradient_accumulation


def total_steps(examples: Sequence[Example], config: TrainConfig) -> int:
    return config.max_steps or math.ceil(config.epochs * steps_per_epoch(examples, config))


# Micro-batches sorted together by length: wide enough to pair rows of like length, narrow enough that an
# epoch's order stays random.
GROUP_WINDOW = 32


def micro_batches(examples: Sequence[Example], config: TrainConfig, skip: int, pad_id: int) -> Iterator[Batch]:
    """Endless micro-batches, each epoch in its own seeded order, starting after the first `skip`.

    The order is a function of (seed, epoch) alone, so a resumed run sees the batches it would have seen.
    With `packing`, a micro-batch is batch_size rows of examples laid end to end (train.packing).
    Without it, `group_by_length` (transformers' option of that name, the same idea) makes a micro-batch
    hold rows of like length, so little of it is padding: a replay mix of long records and short facts
    padded every micro-batch to its longest row."""
    lengths = [example.num_tokens for example in examples]
    epoch = 0
    while True:
        plan = _epoch_plan(lengths, config, random.Random(f"{config.seed}/{epoch}"))
        for rows in plan[skip:]:
            yield (collate_packed([[examples[j] for j in row] for row in rows], pad_id) if config.packing
                   else collate([examples[j] for j in rows], pad_id))
        skip, epoch = max(0, skip - len(plan)), epoch + 1


def _epoch_plan(lengths: Sequence[int], config: TrainConfig, rng: random.Random) -> list[list]:
    """One epoch's micro-batches: lists of example indices, or with packing lists of packed rows (index lists)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if config.packing:
        rows = pack(lengths, order, config.max_seq_len)
        rng.shuffle(rows)   # else every window would run from its fullest rows to its emptiest
        return [rows[i:i + config.batch_size] for i in range(0, len(rows), config.batch_size)]
    if config.group_by_length:
        window = config.batch_size * GROUP_WINDOW
        order = [j for start in range(0, len(order), window)
                 for j in sorted(order[start:start + window], key=lengths.__getitem__, reverse=True)]
    batches = [order[i:i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    if config.group_by_length:
        rng.shuffle(batches)   # else every window would run from its longest rows to its shortest
    return batches


def fit(trainer: Trainer, train: Sequence[Example], config: TrainConfig, state: TrainState, steps: int,
        pad_id: int, validation_loss: Callable[[], float], checkpoint: Callable[[TrainState], None]) -> TrainState:
    """Runs optimizer steps until `steps`, validating and checkpointing every eval_every steps and at the end,
    and stops early when validation loss stops falling for early_stopping_patience validations."""
    from tqdm import tqdm

    stream = micro_batches(train, config, state.step * config.gradient_accumulation, pad_id)
    started, tokens_at_start = time.perf_counter() - state.training_s, state.tokens_trained
    resumed_at = time.perf_counter()
    with tqdm(total=steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True) as progress:
        while state.step < steps:
            batch_group = [next(stream) for _ in range(config.gradient_accumulation)]
            loss = trainer.step(batch_group)
            state.step += 1
            state.tokens_trained += sum(int(batch.attention_mask.sum()) for batch in batch_group)
            state.training_s = time.perf_counter() - started
            state.train_losses.append((state.step, loss))
            speed = (state.tokens_trained - tokens_at_start) / (time.perf_counter() - resumed_at)
            progress.set_postfix(loss=f"{loss:.4f}", tokens_per_s=f"{speed:.0f}")
            progress.update()
            if state.step % config.eval_every and state.step < steps:
                continue
            if _validate(trainer, state, config, validation_loss(), progress.write):
                state.stop_reason = (f"early stopping: validation loss has not improved for "
                                     f"{state.evals_since_best} validations")
            state.training_s = time.perf_counter() - started
            checkpoint(state)
            if state.stop_reason:
                break
    state.stop_reason = state.stop_reason or ("max_steps reached" if config.max_steps else f"{config.epochs} epochs done")
    return state


def _validate(trainer: Trainer, state: TrainState, config: TrainConfig, val_loss: float, say) -> bool:
    """Records a validation loss, keeps the best weights; True when patience has run out."""
    state.val_losses.append((state.step, val_loss))
    improved = val_loss < state.best_val_loss - config.early_stopping_min_delta
    if improved:
        state.best_val_loss, state.best_step, state.evals_since_best = val_loss, state.step, 0
        trainer.keep_best()
    else:
        state.evals_since_best += 1
    say(f"step {state.step}: validation loss {val_loss:.4f} (perplexity {math.exp(val_loss):.3f})"
        + ("  best so far" if improved else f"  best {state.best_val_loss:.4f} at step {state.best_step}"))
    return bool(config.early_stopping_patience) and state.evals_since_best >= config.early_stopping_patience
