"""A general held-out text set for measuring forgetting, built from the docstrings of Python's own library.

Every Python install carries this text, so nothing is downloaded and every machine builds the same
set for the same Python version (its fingerprint goes in the report; compare figures only between
equal fingerprints). It is English prose about everyday programming, nothing a domain adapter
should need to change, and a rise in its perplexity is what an adapter cost the base.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path

from .train.datasets import Example

# Pure-Python modules whose docstrings are long, varied and stable across Python releases.
MODULES = ("argparse", "calendar", "csv", "difflib", "fractions", "heapq", "json", "logging", "shutil",
           "statistics", "string", "textwrap", "typing", "zipfile", "email.message", "http.cookies")
WINDOW = 256
_MIN_DOCSTRING_CHARS = 80


@dataclass(frozen=True, slots=True)
class GeneralText:
    examples: tuple[Example, ...]
    source: str
    fingerprint: str  # sha256 of the token ids used

    @property
    def num_tokens(self) -> int:
        return sum(len(example.answer_ids) for example in self.examples)


def general_text(tokenizer, num_tokens: int) -> GeneralText:
    """About `num_tokens` tokens in windows of WINDOW, taken round-robin across MODULES.

    The windows do not follow max_seq_len, so runs with different settings measure the same text."""
    windows = _windows(tokenizer)
    chosen = windows[:max(1, num_tokens // WINDOW)]
    fingerprint = hashlib.sha256(repr(chosen).encode()).hexdigest()
    examples = tuple(Example((), ids, None, ("python-docstrings", i)) for i, ids in enumerate(chosen))
    source = (f"docstrings of Python {sys.version_info.major}.{sys.version_info.minor}'s {', '.join(MODULES)}; "
              f"{len(chosen)} windows of {WINDOW} tokens")
    return GeneralText(examples, source, fingerprint)


def general_training_text(tokenizer, num_windows: int, max_seq_len: int) -> GeneralText:
    """`num_windows` windows to train on, cut to max_seq_len, taken from the end of the list that
    general_text measures from the start, so replaying general text never trains on what measures forgetting."""
    windows = _windows(tokenizer)
    chosen = [ids[:max_seq_len] for ids in windows[::-1][:num_windows]]
    fingerprint = hashlib.sha256(repr(chosen).encode()).hexdigest()
    examples = tuple(Example((), ids, None, ("python-docstrings-replay", i)) for i, ids in enumerate(chosen))
    source = f"the last {len(chosen)} of {len(windows)} docstring windows, cut to {max_seq_len} tokens"
    return GeneralText(examples, source, fingerprint)


def _windows(tokenizer) -> list[tuple[int, ...]]:
    per_module = []
    for name in MODULES:
        ids = tokenizer("\n\n".join(_docstrings(name)), add_special_tokens=False)["input_ids"]
        per_module.append([tuple(ids[i:i + WINDOW]) for i in range(0, len(ids) - WINDOW + 1, WINDOW)])
    # Round-robin so a small set still spans many modules rather than the start of one.
    return [w for w in chain.from_iterable(zip_longest(*per_module)) if w is not None]


def _docstrings(module: str) -> list[str]:
    """The module's, its classes' and its functions' docstrings, in the order ast.walk meets them."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc) >= _MIN_DOCSTRING_CHARS:
                found.append(inspect.cleandoc(doc))
    return found
