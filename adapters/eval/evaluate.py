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

from ..train.datasets import IGNORE, Example, collate


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


@dataclass(frozen=True, slots=True)
class AnswerScore:
    nll: float          # summed negative log-likelihood of the answer tokens
    tokens: int         # answer tokens
    reproduced: bool    # every answer token is the model's argmax: greedy decoding gives exactly the answer


def _progress(items: Iterable, label: str | None, total: int) -> Iterable:
    """A progress bar on stderr when `label` names the pass: base and adapter passes take minutes on a CPU."""
    if label is None:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=label, total=total, unit="batch", leave=False, dynamic_ncols=True)


def answer_scores(model, examples: Sequence[Example], batch_size: int, pad_id: int,
                  eos_id: int | None = None, label: str | None = None) -> list[AnswerScore]:
    """Each example's answer, teacher-forced in one pass: its likelihood, and whether greedy decoding reproduces it
    (up to its first `eos_id`, where decoding stops: chat templates put a newline after the end-of-turn token)."""
    # Batched by length, so a batch pads little; the results go back to the caller's order.
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    found: dict[int, AnswerScore] = {}
    with _evaluating(model):
        for start in _progress(range(0, len(order), batch_size), label, math.ceil(len(order) / batch_size)):
            chosen = order[start:start + batch_size]
            batch = collate([examples[i] for i in chosen], pad_id).to(model.device)
            hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                         use_cache=False).last_hidden_state[:, :-1]                         # [B, S-1, H]
            labels = batch.labels[:, 1:]                                                                     # [B, S-1]
            answer = labels != IGNORE
            # Logits only where an answer token is predicted: the vocabulary projection is a fifth of the
            # work per token on a small model, and most of an instruction row is its prompt.
            logits = model.get_output_embeddings()(hidden[answer]).float()                                   # [N, V]
            nll = torch.zeros(labels.shape, device=logits.device)                                            # [B, S-1]
            nll[answer] = F.cross_entropy(logits, labels[answer], reduction="none")
            wrong = torch.zeros_like(answer)                                                                 # [B, S-1]
            wrong[answer] = logits.argmax(dim=-1) != labels[answer]
            decoded = answer
            if eos_id is not None:
                ends = (labels == eos_id) & answer
                decoded = answer & (ends.cumsum(dim=1) - ends.long() == 0)                                   # [B, S-1]
            missed = (wrong & decoded).any(dim=1)                                                            # [B]
            for i, total, count, miss in zip(chosen, nll.sum(dim=1).tolist(), answer.sum(dim=1).tolist(),
                                             missed.tolist()):
                found[i] = AnswerScore(total, count, not miss)
    return [found[i] for i in range(len(examples))]


def measure_loss(model, examples: Sequence[Example], batch_size: int, pad_id: int,
                 label: str | None = None) -> Measurement:
    scores = answer_scores(model, examples, batch_size, pad_id, label=label)
    # Summed, not averaged per row, so every answer token weighs the same.
    tokens = sum(score.tokens for score in scores)
    loss = sum(score.nll for score in scores) / tokens
    return Measurement(loss, math.exp(loss), tokens)


def greedy_answers(model, tokenizer, examples: Sequence[Example], batch_size: int, extra_tokens: int = 4,
                   label: str | None = None) -> list[str]:
    """Each example's greedy answer to its prompt, decoded, for up to its reference's length + `extra_tokens`."""
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    found: dict[int, str] = {}
    with _evaluating(model):
        for start in _progress(range(0, len(order), batch_size), label, math.ceil(len(order) / batch_size)):
            chosen = order[start:start + batch_size]
            group = [examples[i] for i in chosen]
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
                                       max_new_tokens=max(len(example.answer_ids) for example in group) + extra_tokens,
                                       do_sample=False, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id)
            for i, answer_ids in zip(chosen, generated[:, width:]):
                found[i] = tokenizer.decode(answer_ids, skip_special_tokens=True)
    return [found[i] for i in range(len(examples))]


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int,
                label: str | None = None) -> float | None:
    """Share of rows with a reference answer whose greedy answer equals it (surrounding spaces aside)."""
    checkable = [example for example in examples if example.answer is not None]
    if not checkable:
        return None
    answers = greedy_answers(model, tokenizer, checkable, batch_size, label=label)
    return sum(answer.strip() == example.answer.strip() for answer, example in zip(answers, checkable)) / len(checkable)


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
