"""KVCacheManager: block tables, prefix-cache hits over the hash chain, and all-or-nothing allocation."""

from __future__ import annotations

import pytest

from distgen.engine_core.kv_cache_manager import KVCacheManager, cdiv
from distgen.engine_core.request import Request
from distgen.sampling_spec import SamplingSpec

BS = 4


def req(rid: str, tokens: list[int], **params) -> Request:
    return Request(rid, tokens, SamplingSpec(max_tokens=8, **params), max_tokens=8)


def admit(kv: KVCacheManager, r: Request, num_new: int | None = None):
    """Schedule ``r`` for the first time as the scheduler does: hits, then the rest of its tokens."""
    hits, num_hit = kv.get_computed_blocks(r)
    n = r.num_tokens - num_hit if num_new is None else num_new
    new = kv.allocate_slots(r, n, hits)
    assert new is not None
    r.num_computed_tokens = num_hit + n
    return hits, num_hit, new


def ids(blocks) -> list[int]:
    return [b.block_id for b in blocks]


def test_cdiv():
    assert [cdiv(n, 4) for n in range(0, 10)] == [0, 1, 1, 1, 1, 2, 2, 2, 2, 3]


@pytest.mark.parametrize("num_tokens", list(range(1, 3 * BS + 2)))
def test_blocks_needed_is_ceil(num_tokens):
    kv = KVCacheManager(16, BS, enable_caching=True)
    r = req("a", list(range(100, 100 + num_tokens)))
    new = kv.allocate_slots(r, num_tokens)
    assert len(new) == cdiv(num_tokens, BS)
    assert kv.block_ids("a") == ids(new)
    assert kv.pool.num_free_blocks == 16 - len(new)


def test_blocks_grow_one_at_a_time_when_decoding():
    kv = KVCacheManager(16, BS, enable_caching=False)
    r = req("a", [1, 2, 3])
    assert len(kv.allocate_slots(r, 3)) == 1
    r.num_computed_tokens = 3
    grown = []
    for step in range(2 * BS):
        r.append_output_token(50 + step)
        grown.append(len(kv.allocate_slots(r, 1)))
        r.num_computed_tokens += 1
    # Tokens 4 .. 11 are computed: a new block opens at tokens 5 and 9 (1-based).
    assert grown == [0, 1, 0, 0, 0, 1, 0, 0]
    assert len(kv.block_ids("a")) == cdiv(r.num_computed_tokens, BS) == 3


def test_chunks_allocate_incrementally():
    kv = KVCacheManager(16, BS, enable_caching=True)
    r = req("a", list(range(10)))
    assert len(kv.allocate_slots(r, 3)) == 1
    r.num_computed_tokens = 3
    assert len(kv.allocate_slots(r, 3)) == 1  # tokens 3..5 -> 2 blocks in all
    r.num_computed_tokens = 6
    assert len(kv.allocate_slots(r, 4)) == 1  # tokens 6..9 -> 3 blocks in all
    assert len(kv.block_ids("a")) == 3


@pytest.mark.parametrize("extra", [1, 2, 3])
def test_second_request_hits_full_blocks(extra):
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = list(range(3 * BS + extra))
    a = req("a", prompt)
    admit(kv, a)
    b = req("b", prompt)
    hits, num_hit, new = admit(kv, b)
    assert num_hit == 3 * BS
    assert ids(hits) == kv.block_ids("a")[:3]
    assert kv.block_ids("b")[:3] == kv.block_ids("a")[:3]
    assert len(new) == 1 and new[0].block_id != kv.block_ids("a")[3]


def test_full_block_prompt_never_hits_its_last_token():
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = list(range(3 * BS))
    admit(kv, req("a", prompt))
    hits, num_hit, new = admit(kv, req("b", prompt))
    assert num_hit == 2 * BS  # k*block_size tokens -> k-1 blocks
    assert len(hits) == 2 and len(new) == 1


def test_one_block_prompt_gets_no_hit():
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = list(range(BS))
    admit(kv, req("a", prompt))
    assert kv.get_computed_blocks(req("b", prompt)) == ([], 0)


def test_partial_blocks_are_not_shared():
    kv = KVCacheManager(32, BS, enable_caching=True)
    admit(kv, req("a", list(range(BS + 3))))
    # Same first block and the same 3 tokens after it, plus more: only the full block is a hit.
    hits, num_hit, _ = admit(kv, req("b", list(range(BS + 3)) + [77, 78]))
    assert num_hit == BS and len(hits) == 1


def test_hit_only_for_the_common_prefix():
    kv = KVCacheManager(32, BS, enable_caching=True)
    x, y, z = [1] * BS, [2] * BS, [3] * BS
    admit(kv, req("a", x + y + z + [9]))
    _, num_hit, _ = admit(kv, req("b", x + y + [5] * BS + [9]))
    assert num_hit == 2 * BS


def test_same_block_after_different_prefix_is_not_a_hit():
    kv = KVCacheManager(32, BS, enable_caching=True)
    x, y, z = [1] * BS, [2] * BS, [3] * BS
    admit(kv, req("a", x + y + [9]))
    hits, num_hit, _ = admit(kv, req("b", z + y + [9]))  # block y again, but after z
    assert hits == [] and num_hit == 0
    assert set(kv.block_ids("a")).isdisjoint(kv.block_ids("b"))
    # And a request that shares x but not y hits only x.
    _, num_hit, _ = admit(kv, req("c", x + z + [9]))
    assert num_hit == BS


def test_output_tokens_extend_the_hash_chain():
    kv = KVCacheManager(32, BS, enable_caching=True)
    a = req("a", list(range(BS + 2)))
    admit(kv, a)
    for t in (70, 71, 72):  # fill the second block with prompt + sampled tokens
        a.append_output_token(t)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    assert a.num_computed_tokens == 2 * BS + 1
    b = req("b", list(range(BS + 2)) + [70, 71, 72])
    _, num_hit, _ = admit(kv, b)
    assert num_hit == 2 * BS
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]


def test_shared_blocks_have_two_references_and_free_tail_first():
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = list(range(2 * BS + 1))
    a = req("a", prompt)
    b = req("b", prompt + [40, 41, 42, 43, 44])
    admit(kv, a)
    admit(kv, b)
    pool = kv.pool
    a_ids, b_ids = kv.block_ids("a"), kv.block_ids("b")
    assert a_ids[:2] == b_ids[:2]
    assert [pool.blocks[i].ref_cnt for i in a_ids] == [2, 2, 1]
    assert [pool.blocks[i].ref_cnt for i in b_ids] == [2, 2, 1, 1]

    kv.free(b)
    assert [pool.blocks[i].ref_cnt for i in a_ids] == [1, 1, 1]
    assert list(pool.free)[-2:] == [b_ids[3], b_ids[2]]  # b's own blocks, last block first
    assert "b" not in kv.req_blocks and "b" not in kv.num_cached_blocks

    kv.free(a)
    assert list(pool.free)[-3:] == [a_ids[2], a_ids[1], a_ids[0]]
    assert all(blk.ref_cnt == 0 for blk in pool.blocks)
    assert pool.num_free_blocks == 32
    # Freed full blocks stay cached: the head of a request's prefix is evicted last.
    assert kv.get_computed_blocks(req("c", prompt))[1] == 2 * BS


def test_free_unknown_request_is_a_no_op():
    kv = KVCacheManager(4, BS, enable_caching=True)
    kv.free(req("nobody", [1, 2]))
    assert kv.pool.num_free_blocks == 4


def test_prompt_logprobs_requests_skip_the_cache():
    kv = KVCacheManager(32, BS, enable_caching=True)
    prompt = list(range(3 * BS + 1))
    admit(kv, req("a", prompt))
    b = req("b", prompt, prompt_logprobs=2)
    assert kv.get_computed_blocks(b) == ([], 0)
    assert kv.get_computed_blocks(req("c", prompt, prompt_logprobs=0)) == ([], 0)
    # Without prompt_logprobs the same prompt hits.
    assert kv.get_computed_blocks(req("d", prompt))[1] == 3 * BS


def test_no_hits_when_caching_disabled():
    kv = KVCacheManager(32, BS, enable_caching=False)
    prompt = list(range(3 * BS + 1))
    a = req("a", prompt)
    admit(kv, a)
    kv.free(a)
    assert kv.get_computed_blocks(req("b", prompt)) == ([], 0)
    assert kv.pool.cached == {}


def _snapshot(kv: KVCacheManager):
    pool = kv.pool
    return (
        list(pool.free),
        [(b.ref_cnt, b.block_hash) for b in pool.blocks],
        dict(pool.cached),
        {k: list(v) for k, v in kv.req_blocks.items()},
        dict(kv.num_cached_blocks),
    )


def test_allocate_slots_short_pool_has_no_side_effects():
    kv = KVCacheManager(4, BS, enable_caching=True)
    a = req("a", list(range(2 * BS)))
    admit(kv, a)  # 2 of 4 blocks in use
    before = _snapshot(kv)
    b = req("b", list(range(100, 100 + 2 * BS + 1)))
    assert kv.allocate_slots(b, 2 * BS + 1) is None  # needs 3, 2 free
    assert _snapshot(kv) == before
    assert "b" not in kv.req_blocks
    # A running request asking for more than is left also gets None and keeps what it had.
    a.append_output_token(5)
    assert kv.allocate_slots(a, 3 * BS) is None
    assert _snapshot(kv) == before
    # What fits still works afterwards.
    assert len(kv.allocate_slots(b, 2 * BS)) == 2
    assert kv.pool.num_free_blocks == 0


def test_allocate_slots_counts_free_hit_blocks_as_unavailable():
    kv = KVCacheManager(5, BS, enable_caching=True)
    prompt = list(range(2 * BS + 1))
    a = req("a", prompt)
    admit(kv, a)
    kv.free(a)  # 2 cached full blocks with ref 0 sit in the free list
    pool = kv.pool
    assert pool.num_free_blocks == 5

    # b hits the 2 blocks and needs 4 more: 5 free, but 2 of them are its own hits -> only 3 usable.
    b = req("b", prompt + list(range(50, 50 + 3 * BS)))
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 2 * BS and all(h.ref_cnt == 0 for h in hits)
    before = _snapshot(kv)
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits) is None
    assert _snapshot(kv) == before
    assert all(h.ref_cnt == 0 and h.block_id in pool.free for h in hits)

    # c hits the same blocks and needs exactly 3 more: fits, and uses every block.
    c = req("c", prompt + list(range(50, 50 + 2 * BS)))
    hits, num_hit = kv.get_computed_blocks(c)
    new = kv.allocate_slots(c, c.num_tokens - num_hit, hits)
    assert new is not None and len(new) == 3
    assert pool.num_free_blocks == 0
    assert kv.block_ids("c")[:2] == ids(hits)
    assert all(h.ref_cnt == 1 for h in hits)
    assert set(ids(new)).isdisjoint(ids(hits))


def test_hit_blocks_held_by_others_do_not_reduce_free_space():
    kv = KVCacheManager(5, BS, enable_caching=True)
    prompt = list(range(2 * BS + 1))
    admit(kv, req("a", prompt))  # 3 blocks held, 2 free
    b = req("b", prompt + [60] * (2 * BS - 1))  # hits 2 (held by a), needs 2 more
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 2 * BS and all(h.ref_cnt == 1 for h in hits)
    new = kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    assert new is not None and len(new) == 2
    assert kv.pool.num_free_blocks == 0


def test_blocks_are_cached_only_when_full_of_computed_tokens():
    kv = KVCacheManager(16, BS, enable_caching=True)
    prompt = list(range(3 * BS))
    a = req("a", prompt)
    kv.allocate_slots(a, BS + 2)  # a chunk: block 0 full, block 1 half
    a.num_computed_tokens = BS + 2
    blocks = [kv.pool.blocks[i] for i in kv.block_ids("a")]
    assert blocks[0].block_hash is not None and blocks[1].block_hash is None
    assert kv.get_computed_blocks(req("b", prompt))[1] == BS
    kv.allocate_slots(a, 2 * BS - 2)  # the rest of the prompt
    assert all(kv.pool.blocks[i].block_hash is not None for i in kv.block_ids("a"))
    assert kv.get_computed_blocks(req("c", prompt))[1] == 2 * BS


def test_a_prompt_past_the_long_rope_length_has_its_own_hash_chain():
    """LongRoPE (Phi-3) rotates a long prompt differently from its first token: a shorter prompt's
    blocks on the same tokens are not hits for it, while long prompts share theirs."""
    kv = KVCacheManager(32, BS, enable_caching=True, long_prompt=10)
    tokens = list(range(100, 120))
    admit(kv, req("short", tokens[:9]))
    assert kv.get_computed_blocks(req("long", tokens))[1] == 0
    admit(kv, req("long", tokens))
    assert kv.get_computed_blocks(req("long2", tokens[:12]))[1] == 8
    assert kv.get_computed_blocks(req("short2", tokens[:10]))[1] == 8  # the short prompt's 2 blocks
