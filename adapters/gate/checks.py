"""From per-item scores to verdicts: one Check per suite, per general set and per general-text figure.

Each check compares the candidate with a reference model (the live version, or the base for a first
version), paired item by item, and says in one line what it measured against which limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .config import GateConfig
from .general_sets import ChoiceSet
from .scoring import BASE, CANDIDATE, ItemScores, TextFigures
from .stats import mcnemar_exact, paired_bootstrap
from .suites import SuiteItems


@dataclass(frozen=True, slots=True)
class PairedChange:
    """The candidate against one reference model on the same items."""
    against: str                       # "live" | "base"
    before: float                      # the reference's accuracy (or mean loss)
    after: float                       # the candidate's
    change: float                      # after - before, in `unit`
    interval: tuple[float, float]      # 95% paired bootstrap interval of `change`
    unit: str                          # "points" (of accuracy) | "nats" (of mean answer loss)
    mcnemar_p: float | None            # exact McNemar p; None for losses
    right_to_wrong: int
    wrong_to_right: int


@dataclass(frozen=True, slots=True)
class Flip:
    """An item the reference answered right and the candidate answers wrong."""
    check: str
    prompt: str
    expected: str
    before: str                        # the reference model's answer
    after: str                         # the candidate's


@dataclass(frozen=True, slots=True)
class Check:
    name: str                          # "retained:facts", "general-set:piqa", "general-text:perplexity"
    kind: str                          # learned | retained | general_set | general_text
    passed: bool
    verdict: str                       # the figures and the limit, in one line
    items: int
    changes: tuple[PairedChange, ...] = ()
    warnings: tuple[str, ...] = ()
    flips: tuple[Flip, ...] = ()


def paired_accuracy(before: Sequence[bool], after: Sequence[bool], against: str, seed: int,
                    resamples: int) -> PairedChange:
    right_to_wrong = sum(b and not a for b, a in zip(before, after))
    wrong_to_right = sum(a and not b for b, a in zip(before, after))
    low, high = paired_bootstrap([float(x) for x in before], [float(x) for x in after], seed, resamples)
    accuracy_before, accuracy_after = sum(before) / len(before), sum(after) / len(after)
    return PairedChange(against, accuracy_before, accuracy_after, 100 * (accuracy_after - accuracy_before),
                        (100 * low, 100 * high), "points", mcnemar_exact(right_to_wrong, wrong_to_right),
                        right_to_wrong, wrong_to_right)


def paired_loss(before: Sequence[float], after: Sequence[float], against: str, seed: int,
                resamples: int) -> PairedChange:
    mean_before, mean_after = sum(before) / len(before), sum(after) / len(after)
    return PairedChange(against, mean_before, mean_after, mean_after - mean_before,
                        paired_bootstrap(before, after, seed, resamples), "nats", None, 0, 0)


def suite_check(items: SuiteItems, reference: str, scores: dict[str, ItemScores], config: GateConfig) -> Check:
    before, after = scores[reference], scores[CANDIDATE]
    name = f"{items.suite.role}:{items.suite.name}"
    warnings = _size_warning(len(items.examples), config)
    if not items.checkable:
        change = paired_loss(before.losses, after.losses, reference, config.seed, config.bootstrap_resamples)
        if items.suite.role == "learned":
            passed = change.after < change.before
            limit = "must fall"
        else:
            passed = change.after <= change.before * (1 + config.retained.max_loss_increase)
            limit = f"may rise {config.retained.max_loss_increase:.0%}"
        verdict = (f"answer loss {change.before:.3f} -> {change.after:.3f} vs {reference} ({limit}; 95% CI "
                   f"{_interval(change)} nats)")
        return Check(name, items.suite.role, passed, verdict, len(items.examples), (change,), warnings)
    change = paired_accuracy(before.correct, after.correct, reference, config.seed, config.bootstrap_resamples)
    flips = tuple(Flip(name, prompt, example.answer, old, new)
                  for prompt, example, old, new, was, now in zip(items.prompts, items.examples, before.answers,
                                                                 after.answers, before.correct, after.correct)
                  if was and not now)
    if items.suite.role == "learned":
        target = items.rule.target
        passed = ((target is not None and change.after >= target) or change.after > change.before
                  or (change.after == change.before and after.mean_loss < before.mean_loss))
        limit = (f"must beat {reference}" + (f" or reach {target:.1%}" if target is not None else "")
                 + f"; answer loss {before.mean_loss:.3f} -> {after.mean_loss:.3f}")
    else:
        passed = -change.change <= items.rule.max_drop
        limit = f"may drop {items.rule.max_drop:g} points"
    verdict = (f"{items.rule.match} match {change.before:.1%} -> {change.after:.1%} vs {reference} "
               f"({change.change:+.1f} points, {limit}; {_stats(change)})")
    return Check(name, items.suite.role, passed, verdict, len(items.examples), (change,), warnings, flips)


def general_set_check(choice_set: ChoiceSet, reference: str, chosen: dict[str, tuple[int, ...]],
                      config: GateConfig) -> Check:
    items = choice_set.items
    correct = {name: [pick == item.gold for pick, item in zip(picks, items)] for name, picks in chosen.items()}
    # Paired against the base and the live version both; the gate holds the candidate to the reference.
    changes = tuple(paired_accuracy(correct[name], correct[CANDIDATE], name, config.seed, config.bootstrap_resamples)
                    for name in dict.fromkeys((reference, BASE)))
    gated = changes[0]
    name = f"general-set:{choice_set.source.name}"
    flips = tuple(Flip(name, item.context, item.options[item.gold], item.options[chosen[reference][i]],
                       item.options[chosen[CANDIDATE][i]])
                  for i, item in enumerate(items) if correct[reference][i] and not correct[CANDIDATE][i])
    # A few hundred items of a hard set move by chance: a drop fails only when it is over the limit and
    # its whole 95% interval lies below zero.
    passed = -gated.change <= config.general_sets.max_drop or gated.interval[1] >= 0
    also = "".join(f"; vs {c.against} {c.change:+.1f} points ({_stats(c)})" for c in changes[1:])
    verdict = (f"log-likelihood accuracy {gated.before:.1%} -> {gated.after:.1%} vs {reference} "
               f"({gated.change:+.1f} points, fails below -{config.general_sets.max_drop:g} with the interval below 0; "
               f"{_stats(gated)}){also}")
    return Check(name, "general_set", passed, verdict, len(items), changes, _size_warning(len(items), config), flips)


def general_text_checks(figures: dict[str, TextFigures], reference: str, config: GateConfig) -> list[Check]:
    limits = config.general_text
    before, after = figures[reference], figures[CANDIDATE]
    rise = after.perplexity / before.perplexity - 1
    perplexity = Check("general-text:perplexity", "general_text", rise <= limits.max_perplexity_increase,
                       f"perplexity {before.perplexity:.3f} -> {after.perplexity:.3f} vs {reference} ({rise:+.1%}, "
                       f"may rise {limits.max_perplexity_increase:.0%}); base {figures[BASE].perplexity:.3f}",
                       after.tokens)
    kl_limit = "reported only" if limits.max_kl is None else f"may reach {limits.max_kl:g}"
    kl = Check("general-text:kl", "general_text", limits.max_kl is None or after.kl_from_base <= limits.max_kl,
               f"mean per-token KL from the base {after.kl_from_base:.4f} nats"
               + (f" (live {figures['live'].kl_from_base:.4f})" if "live" in figures else "") + f" ({kl_limit})",
               after.tokens)
    return [perplexity, kl]


def _size_warning(count: int, config: GateConfig) -> tuple[str, ...]:
    if count >= config.min_items:
        return ()
    return (f"only {count} items (fewer than {config.min_items}): one item is {100 / count:.1f} points, "
            "so read the interval, not just the change",)


def _interval(change: PairedChange) -> str:
    return f"[{change.interval[0]:+.1f}, {change.interval[1]:+.1f}]" if change.unit == "points" else \
        f"[{change.interval[0]:+.3f}, {change.interval[1]:+.3f}]"


def _stats(change: PairedChange) -> str:
    return (f"95% CI {_interval(change)}, McNemar p={change.mcnemar_p:.3g}, "
            f"{change.right_to_wrong} right->wrong, {change.wrong_to_right} wrong->right")
