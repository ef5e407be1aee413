"""One `cartridge eval` run: an adapter and the base alone, measured on the user's data and on general text."""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from ..formats.adapter_dir import read_config
from ..formats.base_checkpoint import resolve_base
from ..formats.base_fingerprint import base_fingerprint, check_made_for
from ..general_text import general_text
from ..lora_model import load_base, pick_device, with_saved_lora
from ..train.datasets import read_dataset
from ..train.report import comparison_summary, data_summary, general_summary, library_versions
from .evaluate import PACE, about, compare


@dataclass(frozen=True, slots=True)
class EvalConfig:
    adapter: Path
    data: tuple[str, ...]
    base_model: str | None  # None: the embedded default
    quantized: bool
    max_seq_len: int
    batch_size: int
    general_eval_tokens: int
    max_rejected_fraction: float
    device: str


def run_eval(config: EvalConfig) -> dict:
    """Loss, perplexity and (where rows carry answers) exact match, for base and adapter, per data file.

    The paths are checked before anything is loaded, and the base fingerprint before the model is."""
    from transformers import AutoTokenizer

    read_config(config.adapter)
    device = pick_device(config.device)
    base_dir = resolve_base(config.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    # One file at a time, so each domain gets its own figures.
    datasets = [read_dataset([path], tokenizer, config.max_seq_len, config.max_rejected_fraction)
                for path in config.data]
    print(f"fingerprinting the base {base_dir}", flush=True)
    fingerprint = base_fingerprint(base_dir)
    if not check_made_for(config.adapter, lambda: fingerprint):
        print(f"warning: {config.adapter} does not record which base it was trained on; its shapes are checked, "
              f"its base cannot be", file=sys.stderr, flush=True)
    general = general_text(tokenizer, config.general_eval_tokens)
    print(f"loading the base ({'nf4' if config.quantized else 'dense'}, {device}) and the adapter", flush=True)
    model = with_saved_lora(load_base(base_dir, config.quantized, device), config.adapter)
    return {
        "adapter": str(config.adapter),
        "base": {"path": str(base_dir), "fingerprint": fingerprint,
                 "quantization": "nf4" if config.quantized else "none", "device": str(device)},
        "settings": {key: value for key, value in asdict(config).items() if key not in ("adapter", "data")},
        "data": [{**data_summary(dataset),
                  **comparison_summary(_compare(model, tokenizer, dataset.examples, config.batch_size,
                                                dataset.files[0].path, f"{len(dataset.examples)} rows"))}
                 for dataset in datasets],
        "general_text": general_summary(general, _compare(model, tokenizer, general.examples, config.batch_size,
                                                          "general text", f"{general.num_tokens} tokens")),
        "libraries": library_versions(),
    }


def _compare(model, tokenizer, examples, batch_size: int, label: str, amount: str):
    """compare(), said first with its expected time: one teacher-forced pass each for the base and the adapter."""
    expected = PACE.expected_s(examples, batch_size)
    print(f"measuring {label}: {amount}, base and adapter; {about(expected and 2 * expected)}", flush=True)
    return compare(model, tokenizer, examples, batch_size, with_exact_match=True, label=label)
