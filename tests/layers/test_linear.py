"""How the linear layers split a model across tensor-parallel ranks: any TP size up to the number of
attention heads, with query heads split as evenly as the ranks allow and each KV head held by every
rank whose queries read it."""

from __future__ import annotations

import pytest

from distgen.distributed.parallel_state import split_range
from distgen.layers.linear import HeadShard


@pytest.mark.parametrize("n,parts", [(9, 2), (9, 4), (1536, 5), (7, 7), (3, 1), (10, 3)])
def test_split_range_tiles_the_items_as_evenly_as_possible(n, parts):
    ranges = [split_range(n, parts, i) for i in range(parts)]
    assert ranges[0][0] == 0
    for (start, size), (nxt, _) in zip(ranges, ranges[1:]):
        assert start + size == nxt
    assert sum(size for _, size in ranges) == n
    assert max(size for _, size in ranges) - min(size for _, size in ranges) <= 1


SHAPES = [(9, 3), (4, 2), (4, 1), (8, 8), (12, 4), (14, 2), (32, 8), (6, 2)]


@pytest.mark.parametrize("heads,kv_heads", SHAPES)
def test_every_tp_size_maps_each_query_head_to_its_own_kv_head(heads, kv_heads):
    group = heads // kv_heads
    for tp in range(1, heads + 1):
        seen = []
        for rank in range(tp):
            s = HeadShard.of(heads, kv_heads, tp, rank)
            assert s.num_heads >= 1 and 0 <= s.head_offset < s.group
            for j in range(s.num_heads):
                q = s.q_start + j
                seen.append(q)
                assert s.kv_start + (j + s.head_offset) // s.group == q // group, (tp, rank, j)
            # no KV head is held that none of the rank's queries reads
            assert (s.num_heads - 1 + s.head_offset) // s.group == s.num_kv_heads - 1
        assert seen == list(range(heads))


def test_the_default_models_heads_at_tp_2_and_4():
    """SmolLM2: 9 query heads in 3 groups. At tp=2 each rank holds 2 KV heads (the middle one on both);
    at tp=4 the rank whose heads straddle two groups holds both."""
    assert [HeadShard.of(9, 3, 2, r) for r in range(2)] == [
        HeadShard(q_start=0, num_heads=5, kv_start=0, num_kv_heads=2, group=3, head_offset=0),
        HeadShard(q_start=5, num_heads=4, kv_start=1, num_kv_heads=2, group=3, head_offset=2),
    ]
    shards = [HeadShard.of(9, 3, 4, r) for r in range(4)]
    assert [(s.num_heads, s.num_kv_heads) for s in shards] == [(3, 1), (2, 1), (2, 2), (2, 1)]
    # Even splits keep the usual layout: tp=3 is one KV head and 3 query heads per rank.
    assert {HeadShard.of(9, 3, 3, r).group for r in range(3)} == {3}


def test_a_tp_size_past_the_head_count_is_refused():
    with pytest.raises(ValueError, match="tensor_parallel_size=10 exceeds the model's 9 attention heads"):
        HeadShard.of(9, 3, 10, 0)
    with pytest.raises(ValueError, match="not a multiple of 4 KV heads"):
        HeadShard.of(9, 4, 1, 0)
