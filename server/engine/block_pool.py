"""Who holds which KV-cache block, and which full blocks are kept for reuse (the prefix cache).

A block is held by every block table that lists it (a reference count): requests that share a
cached prefix, or choices forked from one prompt, hold the same full blocks. A full block whose
tokens are known gets a key (prefix_cache.block_key); when its last holder lets go it stays in the
pool, still findable by that key, until a new block is needed and it is the least recently used of
those free cached blocks. Only the engine thread touches these, between forward passes.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable

from .prefix_cache import block_key

SCRATCH_BLOCK = 0   # never handed out: padding rows of a CUDA graph write there


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_cache: bool = True):
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self._free: deque[int] = deque(range(1, num_blocks))     # never cached, or evicted
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()   # cached, held by nobody; least recent first
        self.num_in_use = 0

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks a request could take now: free ones and cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks, each held once; None (and nothing taken) when fewer are free."""
        if count > self.num_free:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:
                block, _ = self._evictable.popitem(last=False)
                del self._block_of[self._key_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        self.num_in_use += count
        return blocks

    def hold(self, block: int) -> None:
        """One more holder of `block` (a shared prefix, a fork)."""
        if self._refs[block] == 0:
            del self._evictable[block]
            self.num_in_use += 1
        self._refs[block] += 1

    def release(self, blocks: list[int]) -> None:
        """Lets go of `blocks`, last first: a request's tail is evicted before the prefix others may share."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self.num_in_use -= 1
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def cached(self, key: bytes) -> int | None:
        return self._block_of.get(key) if self.prefix_cache else None

    def publish(self, block: int, key: bytes) -> None:
        """Makes a full block findable by `key` (a block with the same key already cached stays the one found)."""
        if self.prefix_cache and key not in self._block_of and block not in self._key_of:
            self._key_of[block], self._block_of[key] = key, block


class BlockTable:
    """One request's blocks in token order, and the keys of its leading full blocks (the chain from `root`)."""

    def __init__(self, pool: BlockPool, root: bytes):
        self.pool, self.root = pool, root
        self.ids: list[int] = []
        self.keys: list[bytes] = []

    @property
    def capacity(self) -> int:
        return len(self.ids) * self.pool.block_size

    def blocks_for(self, tokens: int) -> int:
        """How many more blocks `tokens` tokens need."""
        return max(0, -(-tokens // self.pool.block_size) - len(self.ids))

    def grow(self, tokens: int) -> bool:
        """Room for `tokens` tokens; False (nothing taken) when the pool lacks the blocks."""
        blocks = self.pool.allocate(self.blocks_for(tokens))
        if blocks is None:
            return False
        self.ids.extend(blocks)
        return True

    def match(self, tokens: Callable[[int, int], list[int]], length: int) -> int:
        """Holds the cached blocks that already computed the first full blocks of a `length`-token sequence
        (tokens(start, end) gives its ids); returns how many tokens they cover. Needs an empty table."""
        parent = self.root
        size = self.pool.block_size
        for start in range(0, length - size + 1, size):
            key = block_key(parent, tokens(start, start + size))
            block = self.pool.cached(key)
            if block is None:
                break
            self.pool.hold(block)
            self.ids.append(block)
            self.keys.append(key)
            parent = key
        return len(self.ids) * size

    def publish(self, tokens: Callable[[int, int], list[int]], computed: int) -> None:
        """Keys every full block among the first `computed` tokens, whose keys and values are written."""
        size = self.pool.block_size
        while len(self.keys) < min(computed // size, len(self.ids)):
            start = len(self.keys) * size
            key = block_key(self.keys[-1] if self.keys else self.root, tokens(start, start + size))
            self.pool.publish(self.ids[len(self.keys)], key)
            self.keys.append(key)

    def release(self) -> None:
        self.pool.release(self.ids)
        self.ids, self.keys = [], []

    def fork(self, computed: int) -> tuple[BlockTable, tuple[int, int] | None] | None:
        """A second table for the first `computed` tokens: the full blocks shared (held once more), the last
        partial one copied on write. Returns it with the (source, destination) block whose keys and values
        the caller copies (PagedKVCache.copy_block), or None when no block is free for that copy."""
        full, partial = divmod(computed, self.pool.block_size)
        copy = None
        if partial:
            blocks = self.pool.allocate(1)
            if blocks is None:
                return None
            copy = (self.ids[full], blocks[0])
        table = BlockTable(self.pool, self.root)
        for block in self.ids[:full]:
            self.pool.hold(block)
        table.ids = self.ids[:full] + ([copy[1]] if copy else [])
        table.keys = self.keys[:full]
        return table, copy
