"""Prefix-cache keys: what produced a block's keys and values, hashed along the chain of blocks.

A full block is found again by the hash of (the previous block's key, its tokens), and the chain
starts at the adapter's key, so one key names every token up to the block's end and the weights that
computed them. The adapter's key is the sha256 of its config and weights files, not its name: a
replaced name, a release or a rollback serves other weights under the same name, and KV computed
under earlier weights must never be served (the bug vLLM #30931 and LMCache #2960 describe).
"""
from __future__ import annotations

import hashlib
from array import array

from ..lora.registry import RegisteredAdapter

BASE_KEY = hashlib.sha256(b"cartridge base model").digest()   # the base alone: one model per server


def adapter_key(adapter: RegisteredAdapter | None) -> bytes:
    """The chain's root for rows of `adapter` (None: the base model alone)."""
    if adapter is None:
        return BASE_KEY
    return hashlib.sha256(f"{adapter.config_sha256}:{adapter.weights_sha256}".encode()).digest()


def block_key(parent: bytes, tokens: list[int]) -> bytes:
    """The key of a full block holding `tokens`, after the block (or adapter root) keyed `parent`."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()
