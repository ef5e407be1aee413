"""Per-item scores of the base, the live version and the candidate, from one load of the base.

All three are one peft model: the candidate and the live adapter are loaded side by side under
their own names and switched with `set_adapter`; the base is the same weights under
`disable_adapter()`. So the gate pays for one base load whatever it compares.
"""
from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..eval.evaluate import answer_scores, greedy_answers
from ..formats.adapter_dir import BaseShape, read_adapter
from ..general_text import GeneralText
from ..lora_model import load_base, peft_wrapping
from .config import SuiteRule
from .general_sets import ChoiceItem
from .suites import SuiteItems

BASE, LIVE, CANDIDATE = "base", "live", "candidate"


class GateModels:
    """The base with the candidate (and the live version, if any) loaded as named adapters."""

    def __init__(self, base_dir: Path, candidate: Path, live: Path | None, quantized: bool, device: torch.device):
        from peft import PeftModel

        base = load_base(base_dir, quantized, device)
        shape = BaseShape.from_config(base.config)
        # The server's own checks first, so the gate refuses exactly what the server would.
        read_adapter(candidate, shape)
        with peft_wrapping():
            self.model = PeftModel.from_pretrained(base, candidate, adapter_name=CANDIDATE).eval()
        self.names = (BASE, CANDIDATE)
        if live is not None:
            read_adapter(live, shape)
            self.model.load_adapter(live, adapter_name=LIVE)
            self.names = (BASE, LIVE, CANDIDATE)

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator:
        if name == BASE:
            with self.model.disable_adapter():
                yield self.model
        else:
            self.model.set_adapter(name)
            yield self.model


@dataclass(frozen=True, slots=True)
class ItemScores:
    """One model on one suite, item by item."""
    answers: tuple[str | None, ...]   # greedy answers, where decoded (None: not needed to judge the item)
    correct: tuple[bool, ...]         # by the suite's match rule; all False for raw-text items
    losses: tuple[float, ...]         # mean negative log-likelihood per answer token

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct)

    @property
    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses)

    def with_answers(self, answers: dict[int, str]) -> "ItemScores":
        return replace(self, answers=tuple(answers.get(i, answer) for i, answer in enumerate(self.answers)))


def score_suite(model, tokenizer, items: SuiteItems, batch_size: int, extra_tokens: int) -> ItemScores:
    scores = answer_scores(model, items.examples, batch_size, tokenizer.pad_token_id, tokenizer.eos_token_id)
    losses = tuple(score.nll / score.tokens for score in scores)
    unread = (None,) * len(scores)
    if not items.checkable:
        return ItemScores(unread, (False,) * len(scores), losses)
    if items.rule.match == "exact":
        # Greedy decoding gives exactly the reference iff every reference token is the argmax after the
        # ones before it, which the teacher-forced pass already shows: no decoding needed to judge.
        return ItemScores(unread, tuple(score.reproduced for score in scores), losses)
    answers = decode_answers(model, tokenizer, items, range(len(scores)), batch_size, extra_tokens)
    correct = tuple(is_correct(answers[i], example.answer, items.rule) for i, example in enumerate(items.examples))
    return ItemScores(tuple(answers[i] for i in range(len(scores))), correct, losses)


def decode_answers(model, tokenizer, items: SuiteItems, indices: Sequence[int], batch_size: int,
                   extra_tokens: int) -> dict[int, str]:
    """Greedy answers of the items at `indices`, stripped."""
    indices = list(indices)
    answers = greedy_answers(model, tokenizer, [items.examples[i] for i in indices], batch_size, extra_tokens)
    return {i: answer.strip() for i, answer in zip(indices, answers)}


def is_correct(answer: str, reference: str, rule: SuiteRule) -> bool:
    """exact: equal after stripping; contains: the reference appears in the answer; regex: the pattern's
    first match in the answer (its group 1, if it has groups) equals the reference."""
    answer, reference = answer.strip(), reference.strip()
    if rule.match == "exact":
        return answer == reference
    if rule.match == "contains":
        return reference in answer
    found = re.search(rule.pattern, answer)
    if found is None:
        return False
    return (found.group(1) if found.re.groups else found.group(0)).strip() == reference


def choose(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int, max_seq_len: int,
           normalized: bool = True) -> tuple[int, ...]:
    """The option each item's model finds likeliest after its context: log-likelihood of the option's
    tokens, divided by its length in characters when `normalized` (lm-eval's acc_norm, which stops
    long options from losing merely for being long)."""
    return tuple(pick(scores, item, normalized)
                 for scores, item in zip(option_loglikelihoods(model, tokenizer, items, batch_size, max_seq_len),
                                         items))


def option_loglikelihoods(model, tokenizer, items: Sequence[ChoiceItem], batch_size: int,
                          max_seq_len: int) -> list[list[float]]:
    """Summed log-probability of each option's tokens after its item's context.

    The context runs once per item and its KV cache is shared by the item's options, so an item
    costs its context plus its options rather than (options x context): 2-4x fewer tokens on these sets."""
    encoded = []
    for item in items:
        options = [tokenizer(" " + option, add_special_tokens=False)["input_ids"][:max_seq_len // 2]
                   for option in item.options]
        # A long passage loses its start, never the question at its end.
        room = max_seq_len - max(map(len, options))
        context = tokenizer(item.context, add_special_tokens=False)["input_ids"][-room:]
        encoded.append((context, options))
    # Sorted by context plus longest option, so neither pass of a group pads much.
    order = sorted(range(len(items)), key=lambda i: len(encoded[i][0]) + max(map(len, encoded[i][1])))
    per_batch = max(1, batch_size // max(len(item.options) for item in items))
    found: dict[int, list[float]] = {}
    with torch.no_grad():
        for start in range(0, len(order), per_batch):
            chosen = order[start:start + per_batch]
            for i, scores in zip(chosen, _score_options(model, [encoded[i] for i in chosen], tokenizer.pad_token_id)):
                found[i] = scores
    return [found[i] for i in range(len(items))]


def _score_options(model, group: list[tuple[list[int], list[list[int]]]], pad_id: int) -> list[list[float]]:
    device = model.device
    width = max(len(context) for context, _ in group)
    # Contexts left-padded, so each one's last token sits in the last column and its cache ends there.
    context_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    context_mask = torch.zeros((len(group), width), dtype=torch.long)
    for row, (context, _) in enumerate(group):
        context_ids[row, width - len(context):] = torch.tensor(context)
        context_mask[row, width - len(context):] = 1
    positions = (context_mask.cumsum(dim=1) - 1).clamp(min=0)
    # Only the last context position's logits are needed: skipping the others saves a fifth of the pass.
    out = model(input_ids=context_ids.to(device), attention_mask=context_mask.to(device),
                position_ids=positions.to(device), use_cache=True, logits_to_keep=1)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)                                   # [G, V]
    owners = [row for row, (_, options) in enumerate(group) for _ in options]
    options = [option for _, opts in group for option in opts]
    cache = out.cache
    cache.batch_select_indices(torch.tensor(owners, device=device))                              # [R, ...]
    option_width = max(len(option) for option in options)
    option_ids = torch.full((len(options), option_width), pad_id, dtype=torch.long)
    option_mask = torch.zeros((len(options), option_width), dtype=torch.long)
    for row, option in enumerate(options):
        option_ids[row, :len(option)] = torch.tensor(option)
        option_mask[row, :len(option)] = 1
    lengths = context_mask.sum(dim=1)[owners]                                                    # [R]
    scores = [first[owner, option[0]].item() for owner, option in zip(owners, options)]
    if option_width > 1:
        logits = model(input_ids=option_ids[:, :-1].to(device),
                       attention_mask=torch.cat([context_mask[owners], option_mask[:, :-1]], dim=1).to(device),
                       position_ids=(lengths[:, None] + torch.arange(option_width - 1)).to(device),
                       cache=cache, use_cache=True).logits                             # [R, O-1, V]
        logits = logits.float()
        logp = logits.gather(-1, option_ids[:, 1:, None].to(device))[..., 0] - logits.logsumexp(dim=-1)  # [R, O-1]
        rest = (logp * option_mask[:, 1:].to(device)).sum(dim=1).tolist()                        # [R]
        scores = [head + tail for head, tail in zip(scores, rest)]
    grouped: list[list[float]] = [[] for _ in group]
    for owner, score in zip(owners, scores):
        grouped[owner].append(score)
    return grouped


def pick(scores: list[float], item: ChoiceItem, normalized: bool) -> int:
    values = [score / len(option) if normalized else score for score, option in zip(scores, item.options)]
    return max(range(len(values)), key=values.__getitem__)


@dataclass(frozen=True, slots=True)
class TextFigures:
    loss: float            # mean negative log-likelihood per token
    perplexity: float
    kl_from_base: float    # mean per-token KL(base || model), nats
    tokens: int


def general_text_figures(models: GateModels, general: GeneralText, batch_size: int,
                         names: Sequence[str]) -> dict[str, TextFigures]:
    """Loss, perplexity and KL from the base on the general text for the models `names`, from one base pass
    per batch (the base's log-probabilities are the reference of every model's KL)."""
    totals = {name: [0.0, 0.0] for name in names}  # name -> [summed nll, summed kl]
    tokens = 0
    with torch.no_grad():
        for start in range(0, len(general.examples), batch_size):
            ids = torch.tensor([example.answer_ids for example in general.examples[start:start + batch_size]],
                               device=models.model.device)                                      # [B, S]
            targets = ids[:, 1:]                                                                 # [B, S-1]
            base_logp = _next_token_logprobs(models, BASE, ids)                                 # [B, S-1, V]
            for name in names:
                logp = base_logp if name == BASE else _next_token_logprobs(models, name, ids)
                totals[name][0] -= logp.gather(-1, targets.unsqueeze(-1)).sum().item()
                totals[name][1] += (base_logp.exp() * (base_logp - logp)).sum().item()
            tokens += targets.numel()
    return {name: TextFigures(nll / tokens, math.exp(nll / tokens), kl / tokens, tokens)
            for name, (nll, kl) in totals.items()}


def _next_token_logprobs(models: GateModels, name: str, ids: torch.Tensor) -> torch.Tensor:
    with models.use(name) as model:
        return F.log_softmax(model(input_ids=ids, use_cache=False).logits[:, :-1].float(), dim=-1)
