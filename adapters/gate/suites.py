"""A gate suite: JSONL rows in the trainer's forms, read into items the gate scores one by one.

A suite is `learned` (the held-out rows of the data the candidate was trained on: it must improve)
or `retained` (an earlier version's held-out rows, or the user's own: it must not get worse).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..train.datasets import Example, read_dataset
from ..train.config import TrainConfig
from .config import GateConfigError, SuiteRule

ROLES = ("learned", "retained")
_PROMPT_CHARS = 400  # of a raw-text row shown in the flip list


@dataclass(frozen=True, slots=True)
class GateSuite:
    name: str
    path: Path
    role: str  # "learned" | "retained"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise GateConfigError(f"suite {self.name!r}: role must be one of {list(ROLES)}, got {self.role!r}")


@dataclass(frozen=True, slots=True)
class SuiteItems:
    suite: GateSuite
    rule: SuiteRule
    examples: tuple[Example, ...]   # the items scored, in file order
    prompts: tuple[str, ...]        # each item's question in the user's words, for the flip list
    rows: int                       # usable items in the file, before the cap
    sha256: str

    @property
    def checkable(self) -> bool:
        """Whether items carry reference answers (chat and instruction rows) rather than raw text."""
        return all(example.answer is not None for example in self.examples)


def read_suite(suite: GateSuite, rule: SuiteRule, tokenizer, max_seq_len: int, seed: int) -> SuiteItems:
    """The suite's items, at most `rule.items` of them (a seeded sample, the same for every model)."""
    dataset = read_dataset([str(suite.path)], tokenizer, max_seq_len,
                           TrainConfig.__dataclass_fields__["max_rejected_fraction"].default)
    examples = list(dataset.examples)
    kinds = {example.answer is None for example in examples}
    if len(kinds) > 1:
        raise GateConfigError(f"suite {suite.name!r} ({suite.path}): mixes raw-text rows with answered rows; "
                              "a suite is scored either by its answers or by its loss, so split it in two")
    if rule.items and len(examples) > rule.items:
        chosen = sorted(random.Random(seed).sample(range(len(examples)), rule.items))
        examples = [examples[i] for i in chosen]
    lines = Path(suite.path).read_text(encoding="utf-8").splitlines()
    prompts = tuple(_prompt_text(json.loads(lines[example.row[1] - 1])) for example in examples)
    return SuiteItems(suite, rule, tuple(examples), prompts, len(dataset.examples), dataset.files[0].sha256)


def _prompt_text(record: dict) -> str:
    """What the user asked: the instruction and input, or the last message before the answer."""
    if "messages" in record:
        return record["messages"][-2]["content"] if len(record["messages"]) > 1 else ""
    if "instruction" in record:
        extra = record.get("input") or ""
        return f"{record['instruction']}\n\n{extra}" if extra.strip() else record["instruction"]
    return record["text"][:_PROMPT_CHARS]
