"""The KV-cache block pool and block tables: reference counts, the prefix cache's keys and LRU eviction,
and forking a request's blocks (full ones shared, the last copied on write)."""
from __future__ import annotations

import torch

from server.engine.block_pool import SCRATCH_BLOCK, BlockPool, BlockTable
from server.engine.prefix_cache import BASE_KEY
from server.model.kv_cache import PagedKVCache

TOKENS = list(range(100, 140))


def tokens(start: int, end: int) -> list[int]:
    return TOKENS[start:end]


def filled(pool: BlockPool, length: int, root: bytes = BASE_KEY) -> BlockTable:
    """A table whose first `length` tokens are computed and published, as the scheduler leaves it."""
    table = BlockTable(pool, root)
    assert table.grow(length)
    table.publish(tokens, length)
    return table


def test_blocks_are_handed_out_once_and_come_back_on_release():
    pool = BlockPool(5, 4, prefix_cache=False)
    table = BlockTable(pool, BASE_KEY)
    assert table.grow(9) and len(table.ids) == 3 and SCRATCH_BLOCK not in table.ids
    assert pool.num_in_use == 3 and pool.num_free == 1
    assert not BlockTable(pool, BASE_KEY).grow(8), "two blocks asked, one free"
    assert pool.num_free == 1, "a failed grow takes nothing"
    table.release()
    assert pool.num_in_use == 0 and pool.num_free == 4 and pool.num_cached == 0


def test_a_later_request_finds_the_full_blocks_of_the_same_tokens_and_root():
    pool = BlockPool(10, 4)
    first = filled(pool, 10)                         # two full blocks, and a partial one never published
    assert len(first.keys) == 2 and pool.num_cached == 2
    second = BlockTable(pool, BASE_KEY)
    assert second.match(tokens, 13) == 8 and second.ids == first.ids[:2]
    assert pool.num_in_use == 3, "shared blocks count once"
    other_root = BlockTable(pool, b"another adapter's weights")
    assert other_root.match(tokens, 13) == 0, "another adapter never finds these blocks"
    assert BlockTable(pool, BASE_KEY).match(tokens, 7) == 4, "of 7 tokens one block is whole"


def test_free_cached_blocks_are_evicted_least_recently_used_first():
    pool = BlockPool(4, 4)                           # three usable blocks
    old = filled(pool, 4, root=b"another adapter's weights")
    new = filled(pool, 8)
    new_ids = list(new.ids)
    old.release()
    new.release()
    assert pool.num_cached == 3 and pool.num_free == 3 and pool.num_in_use == 0
    assert BlockTable(pool, b"a third").grow(8)      # evicts the least recent: old's block, then new's tail
    assert pool.num_cached == 1
    survivor = BlockTable(pool, BASE_KEY)
    assert survivor.match(tokens, 20) == 4 and survivor.ids == [new_ids[0]], \
        "a released request's tail goes first, its prefix stays"


def test_no_prefix_cache_keeps_nothing():
    pool = BlockPool(6, 4, prefix_cache=False)
    filled(pool, 8).release()
    assert pool.num_cached == 0 and BlockTable(pool, BASE_KEY).match(tokens, 20) == 0


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    pool = BlockPool(8, 4)
    cache = PagedKVCache(2, 8, 4, 1, 2, torch.float32, torch.device("cpu"))
    parent = filled(pool, 10)
    for layer in range(2):
        cache.k[layer].normal_()
    child, (source, copy) = parent.fork(10)
    assert child.ids[:2] == parent.ids[:2] and source == parent.ids[2] and copy == child.ids[2] != source
    assert pool.num_in_use == 4
    cache.copy_block(source, copy)
    assert torch.equal(cache.k[1][copy], cache.k[1][source])
    parent.release()
    assert pool.num_in_use == 3, "the child still holds the shared blocks and its copy"
    aligned, nothing = filled(pool, 8).fork(8)
    assert nothing is None and len(aligned.ids) == 2, "a prompt ending on a block edge shares everything"
