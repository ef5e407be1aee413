"""Registered adapters by name: read and checked whole before they become visible, or not at all.

Each adapter's weights live on the host while they may be needed. Under a host budget
(`--max-host-adapter-bytes`) the least recently used idle ones are dropped and read again from
their directory when a request next needs them, after checking the files still hash to what was
registered. An adapter held by a request (queued or running) or pinned is never dropped.
"""
from __future__ import annotations

import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from adapters.formats.adapter_dir import WEIGHTS_FILE, BaseShape, LoraConfig, LoraWeights, read_adapter
from adapters.formats.base_fingerprint import check_made_for
from adapters.formats.cartridge_json import DEFAULTS_FILE, read_defaults

from .files import AdapterFilePolicy, AdapterFiles
from ..errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, ServingError
from .batch import SlotWeights

log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(eq=False)
class RegisteredAdapter:
    """One version of a named adapter. Identity, not name, tells versions apart: requests that
    started on a replaced or unregistered version keep it until they finish. The mutable fields
    change under the registry's lock."""
    name: str
    path: str                         # as the caller gave it
    files: AdapterFiles
    config: LoraConfig
    rank: int
    size_bytes: int                   # LoRA tensors, when held in memory (in the server's dtype)
    config_sha256: str
    weights_sha256: str
    pinned: bool
    weights: SlotWeights | None       # the host copy; None while dropped
    problem: str | None = None        # why it can no longer be served
    users: int = 0                    # requests holding it
    reread_lock: threading.Lock = field(default_factory=threading.Lock)
    version: int | None = None        # a store version (`cartridge serve --store`); None when registered by path
    live: bool = False                # served as the name's live version, not requested as name@vN
    file_bytes: int = 0               # adapter_model.safetensors on disk
    defaults: dict = field(default_factory=dict)   # cartridge.json's, as GenerateRequest fields

    @property
    def store_name(self) -> str:
        return self.name.split("@")[0]


def check_name(name: str, field: str = "name") -> str:
    if not NAME.fullmatch(name):
        raise InvalidArgument(f"{field} {name!r} is not a valid adapter name: 1 to 64 letters, digits, '.', '_' or '-'",
                              field=field)
    return name


class AdapterRegistry:
    def __init__(self, base: BaseShape, max_rank: int, files: AdapterFilePolicy, max_pinned: int,
                 host_budget: int | None = None, *, base_fingerprint: Callable[[], str],
                 stage: Callable[[LoraWeights], SlotWeights], check_defaults: Callable[[dict, str], dict]):
        """`base_fingerprint` hashes the base's weights; it is called (once, cached by the caller) only when
        an adapter records the base it was trained on. `stage` turns weights as read into the form the
        device slots take (SlotWeights.stage with the server's dtype), in the reading thread.
        `check_defaults` turns a cartridge.json's contents (and its path, for errors) into request fields,
        refusing what a request could not ask (server/edge/adapter_defaults.py)."""
        self._stage, self._check_defaults = stage, check_defaults
        self._base, self._max_rank, self._files = base, max_rank, files
        self._max_pinned, self._host_budget = max_pinned, host_budget
        self._base_fingerprint = base_fingerprint
        self._adapters: dict[str, RegisteredAdapter] = {}
        self._on_host: OrderedDict[RegisteredAdapter, None] = OrderedDict()   # least recently used first
        self._lock = threading.Lock()

    def register(self, name: str, path: str, replace: bool = False,
                 pin: bool = False) -> tuple[RegisteredAdapter, RegisteredAdapter | None]:
        """The new version, and the one it replaced (None if the name was free)."""
        check_name(name)
        with self._lock:
            self._check_free(name, replace, pin)
        return self.install(self.read(name, path, pin), replace)

    def read(self, name: str, path: str, pin: bool = False, version: int | None = None,
             live: bool = False) -> RegisteredAdapter:
        """The adapter at `path`, read and checked whole, not yet visible to requests.
        Called outside the lock: a large adapter must not stall lookups for requests."""
        files = self._files.check(path)
        config_sha256, weights_sha256 = files.sha256()
        weights = read_adapter(files.directory, self._base)
        defaults = read_defaults(files.directory)
        if defaults:
            defaults = self._check_defaults(defaults, str(files.directory / DEFAULTS_FILE))
        if not check_made_for(files.directory, self._base_fingerprint):
            log.warning("adapter %r (%s) does not record which base it was trained on: its shapes fit this base, "
                        "but whether it was made for it cannot be checked", name, path)
        rank = max(a.shape[0] for a in weights.a.values())
        if rank > self._max_rank:
            raise InvalidArgument(f"adapter {name!r} has rank {rank}, above this server's "
                                  f"--max-lora-rank {self._max_rank}")
        staged = self._stage(weights)
        return RegisteredAdapter(name, path, files, weights.config, rank, staged.size_bytes, config_sha256,
                                 weights_sha256, pin, staged, version=version, live=live,
                                 file_bytes=(files.directory / WEIGHTS_FILE).stat().st_size, defaults=defaults)

    def install(self, adapter: RegisteredAdapter,
                replace: bool) -> tuple[RegisteredAdapter, RegisteredAdapter | None]:
        """Makes a read adapter visible under its name: the new version, and the one it replaced."""
        name, pin = adapter.name, adapter.pinned
        with self._lock:
            self._check_free(name, replace, pin)
            old = self._adapters.get(name)
            self._adapters[name] = adapter
            self._on_host[adapter] = None
            if old is not None:
                self._retire(old)
            self._shrink()
        return adapter, old

    def _check_free(self, name: str, replace: bool, pin: bool) -> None:
        old = self._adapters.get(name)
        if old is not None and not replace:
            raise AlreadyExists(f"adapter {name!r} is already registered; set replace to swap its weights")
        if pin and sum(a.pinned for a in self._adapters.values() if a is not old) >= self._max_pinned:
            raise ResourceExhausted(f"all {self._max_pinned} device slots (--max-adapters) are held by pinned "
                                    f"adapters; register one of them again without pin first")

    def unregister(self, name: str) -> RegisteredAdapter:
        with self._lock:
            adapter = self._adapters.pop(name, None)
            if adapter is None:
                raise NotFound(f"adapter {name!r} is not registered")
            self._retire(adapter)
        return adapter

    def get(self, name: str) -> RegisteredAdapter:
        with self._lock:
            adapter = self._adapters.get(name)
        if adapter is None:
            raise NotFound(f"adapter {name!r} is not registered")
        return adapter

    def is_current(self, adapter: RegisteredAdapter) -> bool:
        """Whether `adapter` is the version its name stands for now."""
        with self._lock:
            return self._adapters.get(adapter.name) is adapter

    def version_in_use(self, store_name: str, version: int) -> bool:
        """Whether a registered adapter, or one a request still holds, is `store_name`'s version `version`."""
        with self._lock:
            return any(a.version == version and a.store_name == store_name
                       and (a.users or self._adapters.get(a.name) is a)
                       for a in (*self._adapters.values(), *self._on_host))

    def contains(self, name: str) -> bool:
        with self._lock:
            return name in self._adapters

    def list(self) -> list[RegisteredAdapter]:
        with self._lock:
            return sorted(self._adapters.values(), key=lambda a: a.name)

    def hold(self, adapter: RegisteredAdapter) -> None:
        """A request will use `adapter`: from here until drop_hold() its weights stay on the host,
        read again from its directory first if they were dropped."""
        with self._lock:
            if adapter.problem:
                raise FailedPrecondition(adapter.problem)
            if not adapter.pinned and sum(a.pinned for a in self._adapters.values()) >= self._max_pinned:
                raise ResourceExhausted(f"adapter {adapter.name!r} cannot get a device slot: all "
                                        f"{self._max_pinned} (--max-adapters) are held by pinned adapters")
            adapter.users += 1
            if adapter.weights is not None:
                self._on_host.move_to_end(adapter)
                return
        try:
            with adapter.reread_lock:   # concurrent requests for a dropped adapter read it once
                if adapter.weights is None:
                    weights = self._reread(adapter)
                    with self._lock:
                        adapter.weights = weights
                        self._on_host[adapter] = None
                        self._shrink()
        except ServingError:
            self.drop_hold(adapter)
            raise

    def drop_hold(self, adapter: RegisteredAdapter) -> None:
        with self._lock:
            adapter.users -= 1
            if self._adapters.get(adapter.name) is not adapter:
                self._retire(adapter)
            self._shrink()

    def _reread(self, adapter: RegisteredAdapter) -> SlotWeights:
        try:
            files = self._files.check(str(adapter.files.directory))
            if files.sha256() != (adapter.config_sha256, adapter.weights_sha256):
                raise FailedPrecondition(
                    f"adapter {adapter.name!r} changed on disk since it was registered (its {WEIGHTS_FILE} or "
                    f"config no longer has the sha256 taken then); register it again to serve the new files")
            return self._stage(read_adapter(files.directory, self._base))
        except (ServingError, ValueError, OSError) as err:
            message = str(err) if isinstance(err, FailedPrecondition) else \
                f"adapter {adapter.name!r} could not be read again from {adapter.path!r}: {err}"
            with self._lock:
                adapter.problem = message
            raise FailedPrecondition(message) from None

    def _retire(self, adapter: RegisteredAdapter) -> None:
        """A version no name points to any more: its host copy goes once no request holds it."""
        if adapter.users == 0:
            self._drop(adapter)

    def _drop(self, adapter: RegisteredAdapter) -> None:
        adapter.weights = None
        self._on_host.pop(adapter, None)

    def _shrink(self) -> None:
        if self._host_budget is None:
            return
        total = sum(a.size_bytes for a in self._on_host)
        for adapter in list(self._on_host):
            if total <= self._host_budget:
                return
            if adapter.users == 0 and not adapter.pinned:
                self._drop(adapter)
                total -= adapter.size_bytes

