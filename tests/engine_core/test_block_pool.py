"""BlockPool: LRU free list, reference counts, and the prefix-cache index (CPU only, no model)."""

from __future__ import annotations

import pytest

from distgen.engine_core.block_pool import BlockPool, hash_block


def free_ids(pool: BlockPool) -> list[int]:
    return list(pool.free)


def test_rejects_empty_pool():
    with pytest.raises(ValueError):
        BlockPool(0, enable_caching=True)


def test_allocate_takes_from_head_release_appends_to_tail():
    pool = BlockPool(5, enable_caching=True)
    assert free_ids(pool) == [0, 1, 2, 3, 4]
    a = pool.allocate(2)
    assert [b.block_id for b in a] == [0, 1]
    assert all(b.ref_cnt == 1 for b in a)
    assert free_ids(pool) == [2, 3, 4]
    pool.release([a[1], a[0]])  # in the given order, at the tail
    assert free_ids(pool) == [2, 3, 4, 1, 0]
    # LRU: the blocks freed longest ago (never-used 2, 3, 4) are taken before 1, then 0.
    assert [b.block_id for b in pool.allocate(4)] == [2, 3, 4, 1]
    assert free_ids(pool) == [0]
    assert pool.num_free_blocks == 1
    assert pool.usage == pytest.approx(0.8)


def test_release_order_decides_eviction_order():
    pool = BlockPool(4, enable_caching=True)
    blocks = pool.allocate(4)
    pool.release([blocks[2]])
    pool.release([blocks[0], blocks[3]])
    pool.release([blocks[1]])
    assert free_ids(pool) == [2, 0, 3, 1]
    assert [b.block_id for b in pool.allocate(4)] == [2, 0, 3, 1]


def test_touch_and_release_count_references():
    pool = BlockPool(3, enable_caching=True)
    (b,) = pool.allocate(1)
    assert b.ref_cnt == 1
    pool.touch([b])
    pool.touch([b])
    assert b.ref_cnt == 3
    assert b.block_id not in pool.free
    pool.release([b])
    pool.release([b])
    assert b.ref_cnt == 1 and b.block_id not in pool.free
    pool.release([b])
    assert b.ref_cnt == 0 and free_ids(pool)[-1] == b.block_id


def test_touch_takes_a_free_block_out_of_the_free_list():
    pool = BlockPool(3, enable_caching=True)
    (b,) = pool.allocate(1)
    pool.cache_block(b, 123)
    pool.release([b])
    assert b.block_id in pool.free and pool.num_free_blocks == 3
    pool.touch([b])  # a prefix-cache hit revives it
    assert b.ref_cnt == 1
    assert b.block_id not in pool.free and pool.num_free_blocks == 2
    assert pool.lookup(123) is b  # still cached while in use
    # The revived block is not handed out by allocate.
    assert b not in pool.allocate(2)


def test_double_free_asserts():
    pool = BlockPool(2, enable_caching=True)
    (b,) = pool.allocate(1)
    pool.release([b])
    with pytest.raises(AssertionError, match="double free"):
        pool.release([b])


def test_allocating_more_than_free_raises_without_taking_any():
    pool = BlockPool(3, enable_caching=True)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert free_ids(pool) == [2]
    assert pool.allocate(0) == []
    assert free_ids(pool) == [2]


def test_cached_hash_survives_release_until_reallocation():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(a, h)
    assert pool.lookup(h) is a
    pool.release([a])
    assert a.ref_cnt == 0 and a.block_hash == h
    assert pool.lookup(h) is a  # hit after free
    pool.release([b, c])  # free order: a, b, c
    assert pool.lookup(h) is a
    (again,) = pool.allocate(1)  # a is at the head: evicted now
    assert again is a
    assert pool.lookup(h) is None
    assert a.block_hash is None
    assert h not in pool.cached


def test_eviction_of_other_blocks_keeps_hash():
    pool = BlockPool(3, enable_caching=True)
    a, b, c = pool.allocate(3)
    pool.cache_block(c, 7)
    pool.release([c, a, b])  # c goes to the head
    pool.touch([c])  # reuse it, then free it again: now at the tail
    pool.release([c])
    assert free_ids(pool) == [0, 1, 2]
    pool.allocate(2)
    assert pool.lookup(7) is c


def test_cache_block_keeps_first_block_for_a_hash():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)  # same content computed twice: first one stays the index entry
    assert pool.lookup(5) is a
    pool.cache_block(a, 6)  # a block's hash is set once
    assert a.block_hash == 5 and pool.lookup(6) is None
    pool.release([b])
    assert pool.allocate(2)[1] is b  # evicting the duplicate must not drop a's entry
    assert pool.lookup(5) is a


def test_no_hits_without_caching():
    pool = BlockPool(3, enable_caching=False)
    (a,) = pool.allocate(1)
    pool.cache_block(a, 42)
    assert pool.lookup(42) is None
    assert a.block_hash is None
    assert pool.cached == {}
    pool.release([a])
    assert pool.lookup(42) is None
    assert a.block_hash is None


def test_reset_prefix_cache_only_when_all_free():
    pool = BlockPool(3, enable_caching=True)
    a, b = pool.allocate(2)
    pool.cache_block(a, 1)
    pool.cache_block(b, 2)
    pool.release([a])
    assert pool.reset_prefix_cache() is False
    assert pool.lookup(1) is a and pool.lookup(2) is b  # untouched by the refused reset
    pool.release([b])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(1) is None and pool.lookup(2) is None
    assert pool.cached == {}
    assert all(blk.block_hash is None for blk in pool.blocks)
    assert pool.num_free_blocks == 3


def test_hash_block_chains_on_parent():
    h1 = hash_block(None, [1, 2])
    assert hash_block(None, [1, 2]) == h1
    assert hash_block(None, (1, 2)) == h1
    assert hash_block(h1, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(h1, [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])
