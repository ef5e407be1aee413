"""Registered adapters by name: read and checked whole before they become visible, or not at all."""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from adapters.formats.adapter_dir import BaseShape, LoraWeights, read_adapter

from .errors import AlreadyExists, InvalidArgument, NotFound

NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, eq=False, slots=True)
class RegisteredAdapter:
    """One version of a named adapter. Identity, not name, tells versions apart: requests that
    started on a replaced or unregistered version keep it until they finish."""
    name: str
    weights: LoraWeights

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a in self.weights.a.values())


def check_name(name: str, field: str = "name") -> str:
    if not NAME.fullmatch(name):
        raise InvalidArgument(f"{field} {name!r} is not a valid adapter name: 1 to 64 letters, digits, '.', '_' or '-'",
                              field=field)
    return name


class AdapterRegistry:
    def __init__(self, base: BaseShape, max_rank: int):
        self._base, self._max_rank = base, max_rank
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._lock = threading.Lock()

    def register(self, name: str, path: str, replace: bool = False) -> RegisteredAdapter:
        check_name(name)
        if not path:
            raise InvalidArgument("path is empty: give the adapter directory as the server sees it")
        if not Path(path).exists():
            raise NotFound(f"path {path!r} does not exist on the server")
        with self._lock:
            if name in self._adapters and not replace:
                raise AlreadyExists(f"adapter {name!r} is already registered; set replace to swap its weights")
        # Read and check outside the lock: a large adapter must not stall lookups for requests.
        adapter = RegisteredAdapter(name, read_adapter(path, self._base))
        if adapter.rank > self._max_rank:
            raise InvalidArgument(f"adapter {name!r} has rank {adapter.rank}, above this server's "
                                  f"--max-lora-rank {self._max_rank}")
        with self._lock:
            if name in self._adapters and not replace:
                raise AlreadyExists(f"adapter {name!r} is already registered; set replace to swap its weights")
            self._adapters[name] = adapter
        return adapter

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._adapters.pop(name, None) is None:
                raise NotFound(f"adapter {name!r} is not registered")

    def get(self, name: str) -> RegisteredAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFound(f"adapter {name!r} is not registered")
        return adapter

    def list(self) -> list[RegisteredAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)
