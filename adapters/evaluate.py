"""The figures that say what an adapter learned and what it cost: loss, perplexity and exact match.

Training and `cartridge eval` both measure through here, so the report's figures and eval's agree.
The base is measured as the same peft model under `disable_adapter()`: one copy of the weights, and
for QLoRA the very NF4 weights the adapter was trained against.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F

from .datasets import IGNORE, Example, batches


@dataclass(frozen=True, slots=True)
class Measurement:
    loss: float                        # mean negative log-likelihood per answer token
    perplexity: float                  # exp(loss)
    tokens: int                        # answer tokens measured
    exact_match: float | None = None   # share of checkable rows answered exactly; None if not measured


@dataclass(frozen=True, slots=True)
class Comparison:
    base: Measurement
    adapter: Measurement


@contextlib.contextmanager
def _evaluating(model):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _progress(items: Iterable, label: str | None, total: int) -> Iterable:
    """A progress bar on stderr when `label` names the pass: base and adapter passes take minutes on a CPU."""
    if label is None:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, total=total, unit="batch", leave=False, dynamic_ncols=True)


def measure_loss(model, examples: Sequence[Example], batch_size: int, pad_id: int,
                 label: str | None = None) -> Measurement:
    total, tokens = 0.0, 0
    with _evaluating(model):
        for batch in _progress(batches(examples, batch_size, pad_id), label, math.ceil(len(examples) / batch_size)):
            batch = batch.to(model.device)
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits  # [B, S, V]
            # Summed, not averaged per batch, so every answer token weighs the same across batches.
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                                     ignore_index=IGNORE, reduction="sum").item()
            tokens += batch.num_answer_tokens
    loss = total / tokens
    return Measurement(loss, math.exp(loss), tokens)


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int,
                label: str | None = None) -> float | None:
    """Share of rows with a reference answer whose greedy answer equals it (surrounding spaces aside)."""
    checkable = [example for example in examples if example.answer is not None]
    if not checkable:
        return None
    pad_id = tokenizer.pad_token_id
    hits = 0
    with _evaluating(model):
        for start in _progress(range(0, len(checkable), batch_size), label, math.ceil(len(checkable) / batch_size)):
            group = checkable[start:start + batch_size]
            width = max(len(example.prompt_ids) for example in group)
            # Left padding, so every row's answer starts right after its own prompt.
            input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, example in enumerate(group):
                input_ids[i, width - len(example.prompt_ids):] = torch.tensor(example.prompt_ids)
                attention_mask[i, width - len(example.prompt_ids):] = 1
            # The reference answer's length (end-of-turn included) plus a margin is enough to see a
            # match end where it should; a longer answer is not a match anyway.
            generated = model.generate(input_ids=input_ids.to(model.device),
                                       attention_mask=attention_mask.to(model.device),
                                       max_new_tokens=max(len(example.answer_ids) for example in group) + 4,
                                       do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            for example, answer_ids in zip(group, generated[:, width:]):
                hits += tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == example.answer.strip()
    return hits / len(checkable)


def measure(model, tokenizer, examples: Sequence[Example], batch_size: int, with_exact_match: bool,
            label: str | None = None) -> Measurement:
    loss = measure_loss(model, examples, batch_size, tokenizer.pad_token_id, label and f"{label}: loss")
    if not with_exact_match:
        return loss
    return Measurement(loss.loss, loss.perplexity, loss.tokens,
                       exact_match(model, tokenizer, examples, batch_size, label and f"{label}: exact match"))


def compare(model, tokenizer, examples: Sequence[Example], batch_size: int, with_exact_match: bool,
            label: str | None = None) -> Comparison:
    """The same figures for the base alone and for the base with the model's adapter; with `label`, with progress."""
    with model.disable_adapter():
        base = measure(model, tokenizer, examples, batch_size, with_exact_match, label and f"{label}, base")
    return Comparison(base, measure(model, tokenizer, examples, batch_size, with_exact_match,
                                    label and f"{label}, adapter"))
