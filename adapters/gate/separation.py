"""Which general sets a base model answers better than chance: a set where the base guesses gates on noise.

A set separates when the base's length-normalised log-likelihood accuracy (the figure the gate uses)
is at least MIN_MARGIN above chance and an exact one-sided binomial test puts chance below MAX_P.
"""
from __future__ import annotations

import time

from ..formats.base_checkpoint import resolve_base
from ..lora_model import load_base, pick_device
from .general_sets import SOURCES, load_sets, sample
from .scoring import option_loglikelihoods, pick
from .stats import binomial_tail_above

MIN_MARGIN = 0.03
MAX_P = 1e-3
_MAX_SEQ_LEN = 512


def measure_separation(base_model: str | None, items: int, seed: int, batch_size: int, progress=print) -> dict:
    from transformers import AutoTokenizer

    started = time.monotonic()
    base_dir = resolve_base(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = load_base(base_dir, False, pick_device("auto")).eval()
    rows = []
    for choice_set in load_sets(list(SOURCES)):
        chosen = sample(choice_set, items, seed).items
        scores = option_loglikelihoods(model, tokenizer, chosen, batch_size, _MAX_SEQ_LEN)
        plain = sum(pick(s, item, normalized=False) == item.gold for s, item in zip(scores, chosen))
        normed = sum(pick(s, item, normalized=True) == item.gold for s, item in zip(scores, chosen))
        chance = sum(item.chance for item in chosen) / len(chosen)
        p = binomial_tail_above(normed, len(chosen), chance)
        rows.append({"set": choice_set.source.name, "items": len(chosen), "chance": chance,
                     "accuracy": plain / len(chosen), "accuracy_norm": normed / len(chosen), "p_above_chance": p,
                     "separates": normed / len(chosen) - chance >= MIN_MARGIN and p < MAX_P,
                     **choice_set.provenance})
        progress(f"{choice_set.source.name}: {normed}/{len(chosen)} right, chance {chance:.1%} "
                 f"({time.monotonic() - started:.0f} s)")
    return {"base": str(base_dir), "seed": seed, "seconds": time.monotonic() - started, "sets": rows}
