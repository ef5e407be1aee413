"""The figures that say what an adapter learned and what it cost: loss, perplexity and exact match.

Training and `cartridge eval` both measure through here, so the report's figures and eval's agree.
The base is measured as the same peft model under `disable_adapter()`: one copy of the weights, and
for QLoRA the very NF4 weights the adapter was trained against.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, replace
from typing import Iterator, Sequence

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
    # Where not: how many answer tokens it does reproduce, and its own argmax after them.
    kept: int = 0
    instead: int | None = None


class Pace:
    """Seconds per token of the teacher-forced passes so far in this process (padding counted, as it is computed):
    what the next pass is expected to take. Every pass on one model costs about the same per token. The process's
    first batch also pays for warming up, so it counts only until another has been timed."""

    def __init__(self) -> None:
        self.first: tuple[float, int] | None = None
        self.seconds, self.tokens = 0.0, 0

    @property
    def known(self) -> bool:
        return self.first is not None

    def add(self, seconds: float, tokens: int) -> None:
        if self.first is None:
            self.first = (seconds, tokens)
        else:
            self.seconds, self.tokens = self.seconds + seconds, self.tokens + tokens

    def expected_s(self, examples: Sequence[Example], batch_size: int) -> float | None:
        """One answer_scores pass over `examples`; None until a batch has been timed."""
        seconds, tokens = (self.seconds, self.tokens) if self.tokens else self.first or (0.0, 0)
        return seconds / tokens * padded_tokens(examples, batch_size) if tokens else None


PACE = Pace()


def padded_tokens(examples: Sequence[Example], batch_size: int) -> int:
    """Tokens that answer_scores computes for `examples`, padding included (its batches are sorted by length)."""
    lengths = sorted(example.num_tokens for example in examples)
    batches = [lengths[i:i + batch_size] for i in range(0, len(lengths), batch_size)]
    return sum(len(batch) * batch[-1] for batch in batches)


def about(seconds: float | None) -> str:
    if seconds is None:
        return "estimated after its first batch"
    return f"about {seconds:.0f} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def _batches(order: list[int], examples: Sequence[Example], batch_size: int, label: str | None,
             paced: bool = True) -> Iterator[list[int]]:
    """`order` in batches; with `paced`, each teacher-forced batch is timed into PACE. With `label`, a progress bar
    of rows on stderr (elapsed and left), and where no pace was known yet, the pass's expected time as soon as
    its first batch is done."""
    bar = None
    if label is not None:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc=label, unit="row", dynamic_ncols=True)
    unknown = not PACE.known
    try:
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            began = time.perf_counter()
            yield chosen
            if paced:
                PACE.add(time.perf_counter() - began, len(chosen) * max(examples[i].num_tokens for i in chosen))
            if bar is None:
                continue
            bar.update(len(chosen))
            if paced and unknown and start == 0 and len(order) > len(chosen):
                bar.write(f"{label}: {len(order)} rows, "
                          f"{about(PACE.expected_s([examples[i] for i in order], batch_size))}")
    finally:
        if bar is not None:
            bar.close()


def answer_scores(model, examples: Sequence[Example], batch_size: int, pad_id: int,
                  eos_id: int | None = None, label: str | None = None) -> list[AnswerScore]:
    """Each example's answer, teacher-forced in one pass: its likelihood, and whether greedy decoding reproduces it
    (up to its first `eos_id`, where decoding stops: chat templates put a newline after the end-of-turn token)."""
    # Batched by length, so a batch pads little; the results go back to the caller's order.
    order = sorted(range(len(examples)), key=lambda i: examples[i].num_tokens)
    found: dict[int, AnswerScore] = {}
    with _evaluating(model):
        for chosen in _batches(order, examples, batch_size, label):
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
            predicted = torch.full_like(labels, -1)                                                          # [B, S-1]
            predicted[answer] = logits.argmax(dim=-1)
            wrong = answer & (predicted != labels)                                                           # [B, S-1]
            decoded = answer
            if eos_id is not None:
                ends = (labels == eos_id) & answer
                decoded = answer & (ends.cumsum(dim=1) - ends.long() == 0)                                   # [B, S-1]
            missed = wrong & decoded                                                                         # [B, S-1]
            rows = zip(chosen, nll.sum(dim=1).tolist(), answer.sum(dim=1).tolist(), missed.any(dim=1).tolist())
            for row, (i, total, count, miss) in enumerate(rows):
                if not miss:
                    found[i] = AnswerScore(total, count, True)
                    continue
                first = int(missed[row].nonzero()[0])
                found[i] = AnswerScore(total, count, False, int(answer[row, :first].sum()),
                                       int(predicted[row, first]))
    return [found[i] for i in range(len(examples))]


def measure_loss(model, examples: Sequence[Example], batch_size: int, pad_id: int,
                 label: str | None = None) -> Measurement:
    return _loss(answer_scores(model, examples, batch_size, pad_id, label=label))


def _loss(scores: Sequence[AnswerScore]) -> Measurement:
    # Summed, not averaged per row, so every answer token weighs the same.
    tokens = sum(score.tokens for score in scores)
    loss = sum(score.nll for score in scores) / tokens
    return Measurement(loss, math.exp(loss), tokens)


def greedy_answers(model, tokenizer, examples: Sequence[Example], batch_size: int, extra_tokens: int = 4,
                   label: str | None = None, decode: bool = True) -> list:
    """Each example's greedy answer to its prompt, for up to its reference's length + `extra_tokens`: decoded,
    or with `decode` False its token ids."""
    pad_id = tokenizer.pad_token_id
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt_ids))
    found: dict[int, str] = {}
    with _evaluating(model):
        for chosen in _batches(order, examples, batch_size, label, paced=False):
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
                found[i] = tokenizer.decode(answer_ids, skip_special_tokens=True) if decode else answer_ids.tolist()
    return [found[i] for i in range(len(examples))]


def exact_match(model, tokenizer, examples: Sequence[Example], batch_size: int,
                label: str | None = None) -> float | None:
    """Share of rows with a reference answer whose greedy answer equals it (surrounding spaces aside)."""
    checkable = [example for example in examples if example.answer is not None]
    if not checkable:
        return None
    scores = answer_scores(model, checkable, batch_size, tokenizer.pad_token_id, tokenizer.eos_token_id, label)
    return _share(greedy_matches(model, tokenizer, checkable, scores, batch_size))


def _share(matches: list[bool]) -> float | None:
    return sum(matches) / len(matches) if matches else None


def greedy_matches(model, tokenizer, examples: Sequence[Example], scores: Sequence[AnswerScore],
                   batch_size: int, extra_tokens: int = 4) -> list[bool]:
    """Whether greedy decoding answers each row (all with a reference) with its reference text, spaces around aside,
    told from its teacher-forced `scores` wherever they can tell, which is almost everywhere.

    Reproduced: greedy decoding yields the reference's very tokens. Otherwise it yields the reproduced ones, then
    its own argmax: where that spells text the reference does not go on with, the answer differs. Only where it
    does (the reference's tokens spelled another way, as "Nor" + "a" for "N" + "ora") is the rest decoded, from
    there. On a CPU that is one forward pass a batch instead of one per answer token (64 records rows: 8, not 8 x 65)."""
    verdicts: dict[int, bool] = {}
    unsure: list[int] = []
    for i, (example, score) in enumerate(zip(examples, scores)):
        if score.reproduced:
            verdicts[i] = True
            continue
        kept = list(example.answer_ids[:score.kept])
        if score.instead == tokenizer.eos_token_id:     # it stops there
            verdicts[i] = tokenizer.decode(kept, skip_special_tokens=True).strip() == example.answer.strip()
            continue
        spelled = tokenizer.decode([*kept, score.instead], skip_special_tokens=True).strip()
        if "\ufffd" in spelled or example.answer.strip().startswith(spelled):   # a cut character, or the same text
            unsure.append(i)
        else:
            verdicts[i] = False
    if unsure:
        # Decoding goes on from where the reference stopped being reproduced: its prompt is that far along.
        starts = [replace(examples[i], prompt_ids=(*examples[i].prompt_ids, *examples[i].answer_ids[:scores[i].kept]),
                          answer_ids=examples[i].answer_ids[scores[i].kept:]) for i in unsure]
        rest = greedy_answers(model, tokenizer, starts, batch_size, extra_tokens, decode=False)
        for i, ids in zip(unsure, rest):
            text = tokenizer.decode([*examples[i].answer_ids[:scores[i].kept], *ids], skip_special_tokens=True)
            verdicts[i] = text.strip() == examples[i].answer.strip()
    return [verdicts[i] for i in range(len(examples))]


def measure(model, tokenizer, examples: Sequence[Example], batch_size: int, with_exact_match: bool,
            label: str | None = None) -> Measurement:
    """Loss and perplexity, and with `with_exact_match` exact match, all from one teacher-forced pass."""
    scores = answer_scores(model, examples, batch_size, tokenizer.pad_token_id, tokenizer.eos_token_id, label)
    loss = _loss(scores)
    if not with_exact_match:
        return loss
    checkable = [i for i, example in enumerate(examples) if example.answer is not None]
    matches = greedy_matches(model, tokenizer, [examples[i] for i in checkable], [scores[i] for i in checkable],
                             batch_size)
    return Measurement(loss.loss, loss.perplexity, loss.tokens, _share(matches))


def compare(model, tokenizer, examples: Sequence[Example], batch_size: int, with_exact_match: bool,
            label: str | None = None) -> Comparison:
    """The same figures for the base alone and for the base with the model's adapter; with `label`, with progress."""
    with model.disable_adapter():
        base = measure(model, tokenizer, examples, batch_size, with_exact_match, label and f"{label}, base")
    return Comparison(base, measure(model, tokenizer, examples, batch_size, with_exact_match,
                                    label and f"{label}, adapter"))
