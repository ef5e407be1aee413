"""Every score the gate needs, each (model, items) pair computed once and kept in the score cache.

A gate of v3 against v2 scores v2 on the suites, the general text and the general sets that v2 was
scored on when it was gated itself, as the candidate; those come back from the cache, and only the
candidate runs through the model. `from_cache` records, per model, what was read back, for the report.
"""
from __future__ import annotations

from dataclasses import asdict

from ..general_text import GeneralText
from .general_sets import ChoiceSet
from .score_cache import ScoreCache
from .scoring import GateModels, ItemScores, TextFigures, choose, general_text_figures, score_suite
from .suites import SuiteItems


class CachedScores:
    def __init__(self, models: GateModels, tokenizer, identities: dict[str, str], cache: ScoreCache,
                 batch_size: int, max_seq_len: int, extra_answer_tokens: int):
        self.models, self.tokenizer, self.identities, self.cache = models, tokenizer, identities, cache
        self.batch_size, self.max_seq_len, self.extra_answer_tokens = batch_size, max_seq_len, extra_answer_tokens
        self.from_cache: dict[str, list[str]] = {}  # "suite:NAME", "set:NAME" or "text" -> models read back

    def suite(self, name: str, items: SuiteItems) -> ItemScores:
        key = self.cache.key("suite", self.identities[name], items.sha256, [list(e.row) for e in items.examples],
                             items.rule.match, items.rule.pattern, self.max_seq_len, self.extra_answer_tokens)
        found = self._get(key, name, f"suite:{items.suite.name}")
        if found is not None:
            return ItemScores(tuple(found["answers"]), tuple(found["correct"]), tuple(found["losses"]))
        with self.models.use(name) as model:
            scores = score_suite(model, self.tokenizer, items, self.batch_size, self.extra_answer_tokens)
        self.cache.put(key, asdict(scores))
        return scores

    def text(self, general: GeneralText, batch_size: int) -> dict[str, TextFigures]:
        keys = {name: self.cache.key("text", self.identities[name], general.fingerprint, general.source)
                for name in self.models.names}
        figures = {}
        for name, key in keys.items():
            found = self._get(key, name, "text")
            if found is not None:
                figures[name] = TextFigures(**found)
        missing = [name for name in self.models.names if name not in figures]
        computed = general_text_figures(self.models, general, batch_size, missing) if missing else {}
        for name, value in computed.items():
            self.cache.put(keys[name], asdict(value))
        return {**figures, **computed}

    def choices(self, name: str, choice_set: ChoiceSet) -> tuple[int, ...]:
        key = self.cache.key("choices", self.identities[name], choice_set.source.sha256, choice_set.source.prompt,
                             self.max_seq_len, [item.line for item in choice_set.items])
        found = self._get(key, name, f"set:{choice_set.source.name}")
        if found is not None:
            return tuple(found)
        with self.models.use(name) as model:
            chosen = choose(model, self.tokenizer, choice_set.items, self.batch_size, self.max_seq_len)
        self.cache.put(key, list(chosen))
        return chosen

    def _get(self, key: str, name: str, what: str):
        found = self.cache.get(key)
        if found is not None:
            self.from_cache.setdefault(what, []).append(name)
        return found

