"""JSONL rows -> token ids with their loss mask, every bad row reported by file and line.

Three row forms are read: instruction `{"instruction", "input", "output"}`, chat `{"messages": [...]}`
and raw text `{"text"}`. Instruction and chat rows go through `formats.chat.render_example`, the same
rendering the server gives `messages`, and only the answer's tokens carry loss. Raw text is learned whole.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..formats.chat import Message, render_example

IGNORE = -100  # the label transformers' loss skips
_ROLES = ("system", "user", "assistant")
_SHOWN_REJECTIONS = 20


class DataError(ValueError):
    """The data cannot be used for this run; the message says which file, which lines and why."""


@dataclass(frozen=True, slots=True)
class Example:
    """One sequence: loss falls on `answer_ids` only. `answer` is the reference text, None for raw text."""
    prompt_ids: tuple[int, ...]
    answer_ids: tuple[int, ...]
    answer: str | None
    row: tuple[str, int]  # (file, line): where it came from, so a split never parts one row's pieces

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.answer_ids)


@dataclass(frozen=True, slots=True)
class RejectedRow:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}: {self.reason}"


@dataclass(frozen=True, slots=True)
class DataFile:
    path: str
    sha256: str
    rows: int
    rows_rejected: int


@dataclass(frozen=True, slots=True)
class Dataset:
    examples: tuple[Example, ...]
    files: tuple[DataFile, ...]
    rejected: tuple[RejectedRow, ...]

    @property
    def fingerprint(self) -> str:
        """sha256 over the files' own hashes, in the order given: changes whenever any byte of the data does."""
        return hashlib.sha256("".join(f.sha256 for f in self.files).encode()).hexdigest()

    @property
    def rows_used(self) -> int:
        return sum(f.rows - f.rows_rejected for f in self.files)

    @property
    def rows_rejected(self) -> int:
        return len(self.rejected)


@dataclass(frozen=True, slots=True)
class Batch:
    input_ids: torch.Tensor       # [B, S], right-padded
    attention_mask: torch.Tensor  # [B, S], 0 on padding
    labels: torch.Tensor          # [B, S], IGNORE on prompt and padding
    # [B, S] with several examples packed in a row (train.packing): each example's positions restart at 0.
    # None: one example a row.
    position_ids: torch.Tensor | None = None

    @property
    def num_answer_tokens(self) -> int:
        """Tokens that carry loss: labels are shifted by one inside the model, so the first never counts."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def model_inputs(self) -> dict[str, torch.Tensor | bool]:
        """The keyword arguments of the model's forward for this batch (labels aside)."""
        if self.position_ids is None:
            return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        # Packed rows go without a 2D mask: transformers then reads each example's bounds from where its
        # positions restart and builds a block-diagonal causal mask (sdpa, eager), or runs FlashAttention
        # varlen, so no token attends across examples. A cache would switch that reading off.
        return {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}

    def to(self, device: torch.device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     None if self.position_ids is None else self.position_ids.to(device))


def read_dataset(paths: Sequence[str], tokenizer, max_seq_len: int, max_rejected_fraction: float) -> Dataset:
    """Every usable row of `paths`; raises DataError when the bad rows are more than tolerated, or none is usable."""
    examples: list[Example] = []
    files: list[DataFile] = []
    rejected: list[RejectedRow] = []
    for path in paths:
        data = _read_bytes(path)
        rows = 0
        rejected_before = len(rejected)
        for line_number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                examples.extend(_examples_of(line, tokenizer, max_seq_len, (path, line_number)))
            except _BadRow as bad:
                rejected.append(RejectedRow(path, line_number, str(bad)))
        if rows == 0:
            raise DataError(f"{path}: holds no rows")
        files.append(DataFile(path, hashlib.sha256(data).hexdigest(), rows, len(rejected) - rejected_before))
    dataset = Dataset(tuple(examples), tuple(files), tuple(rejected))
    total = sum(f.rows for f in files)
    if dataset.rows_rejected > max_rejected_fraction * total or not examples:
        listed = "\n".join(f"  {row}" for row in rejected[:_SHOWN_REJECTIONS])
        more = f"\n  ... and {len(rejected) - _SHOWN_REJECTIONS} more" if len(rejected) > _SHOWN_REJECTIONS else ""
        raise DataError(f"{len(rejected)} of {total} rows are unusable (at most {max_rejected_fraction:.0%} "
                        f"tolerated, see max_rejected_fraction):\n{listed}{more}")
    return dataset


def split_validation(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation), holding out `fraction` of the rows (at least one), chosen by `seed`."""
    rows = sorted({example.row for example in examples})
    if len(rows) < 2:
        raise DataError("need at least 2 usable rows to hold one out for validation (or give val_data)")
    held_out = set(random.Random(seed).sample(rows, max(1, round(fraction * len(rows)))))
    return ([e for e in examples if e.row not in held_out], [e for e in examples if e.row in held_out])


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    width = max(example.num_tokens for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, example in enumerate(examples):
        place(example, input_ids[i], attention_mask[i], labels[i], start=0)
    return Batch(input_ids, attention_mask, labels)


def place(example: Example, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
          start: int) -> None:
    """Writes `example` into one batch row ([S] views) from token `start`: its ids, a 1 in the mask, and its
    answer ids as labels."""
    prompt, end = start + len(example.prompt_ids), start + example.num_tokens
    input_ids[start:end] = torch.tensor(example.prompt_ids + example.answer_ids)
    attention_mask[start:end] = 1
    labels[prompt:end] = torch.tensor(example.answer_ids)


def _read_bytes(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except OSError as err:
        raise DataError(f"{path}: cannot be read ({err.strerror})") from None


class _BadRow(ValueError):
    pass


def _examples_of(line: bytes, tokenizer, max_seq_len: int, row: tuple[str, int]) -> list[Example]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadRow("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise _BadRow(f"not valid JSON (column {err.colno}: {err.msg})") from None
    if not isinstance(record, dict):
        raise _BadRow(f"expected a JSON object, got {type(record).__name__}")
    if "text" in record and "messages" not in record and "output" not in record:
        return _text_examples(_nonempty_string(record, "text"), tokenizer, max_seq_len, row)
    messages = _messages_of(record)
    prompt, answer = render_example(tokenizer, messages)
    if len(prompt) + len(answer) > max_seq_len:
        # Cutting the prompt would train on a conversation the server never sees; cutting the answer
        # would teach the adapter to stop early. So the row goes.
        raise _BadRow(f"{len(prompt) + len(answer)} tokens after rendering, over max_seq_len {max_seq_len}")
    return [Example(tuple(prompt), tuple(answer), messages[-1]["content"], row)]


def _messages_of(record: dict) -> list[Message]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _BadRow("messages: expected a non-empty list of {role, content} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in _ROLES:
                raise _BadRow(f"messages[{i}]: role must be one of {list(_ROLES)}")
            _nonempty_string(message, "content", f"messages[{i}].")
        if messages[-1]["role"] != "assistant":
            raise _BadRow("the last message must be the assistant's answer, which is what is learned")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record or "output" in record:
        instruction = _nonempty_string(record, "instruction")
        extra = record.get("input", "")
        if not isinstance(extra, str):
            raise _BadRow("input: expected a string")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user},
                {"role": "assistant", "content": _nonempty_string(record, "output")}]
    raise _BadRow("expected an instruction row {instruction, input, output}, a chat row {messages} "
                  "or a text row {text}")


def _nonempty_string(record: dict, key: str, where: str = "") -> str:
    value = record.get(key)
    if value is None:
        raise _BadRow(f"{where}{key}: missing")
    if not isinstance(value, str):
        raise _BadRow(f"{where}{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"{where}{key}: empty")
    return value


def _text_examples(text: str, tokenizer, max_seq_len: int, row: tuple[str, int]) -> list[Example]:
    # Raw text has no answer to protect, so a long document becomes several max_seq_len windows.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [Example((), tuple(ids[start:start + max_seq_len]), None, row)
            for start in range(0, len(ids), max_seq_len) if len(ids[start:start + max_seq_len]) > 1]
