"""Per-request block tables on top of the block pool, with prefix-cache lookups."""

from __future__ import annotations

from distgen.engine_core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block
from distgen.engine_core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# The hash chain's root for a prompt longer than ``long_prompt`` (LongRoPE rotates every token of
# such a prompt with its long factors, so its blocks differ from a shorter prompt's on the same tokens).
_LONG_PROMPT_ROOT: BlockHash = -0x10C0DE  # an int: str hashes differ between processes


class KVCacheManager:
    def __init__(
        self, num_blocks: int, block_size: int, enable_caching: bool, long_prompt: int | None = None
    ) -> None:
        self.block_size = block_size
        self.long_prompt = long_prompt
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self.num_cached_blocks: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _update_hashes(self, request: Request) -> None:
        """Extend the request's hash chain to cover every full block of its known tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        tokens = request.all_token_ids
        root = None
        if self.long_prompt is not None and request.num_prompt_tokens > self.long_prompt:
            root = _LONG_PROMPT_ROOT
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            hashes.append(hash_block(hashes[-1] if hashes else root, tokens[i * bs : (i + 1) * bs]))

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of ``request`` in full blocks, and how many tokens it covers.

        The last token is always recomputed (its logits are needed), so a full hit stops one
        block short. Requests that want prompt logprobs skip the cache: those need every position.
        """
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        self._update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed: list[KVCacheBlock] | None = None
    ) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` more tokens of ``request``; None if the pool is short.

        ``computed`` are prefix-cache hits found by :meth:`get_computed_blocks` for a request that
        is being scheduled for the first time (or again after preemption).
        """
        rid = request.request_id
        blocks = self.req_blocks.get(rid, [])
        num_hits = len(computed) if computed else 0
        total = request.num_computed_tokens + num_hits * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(blocks) - num_hits
        new_blocks: list[KVCacheBlock] = []
        if need > 0 or computed:  # most decode steps have room in their last block: nothing to take
            computed = computed or []
            # Hit blocks with no other user sit in the free list: taking them shrinks what is left.
            num_evictable_hits = sum(1 for b in computed if b.ref_cnt == 0)
            if need > self.pool.num_free_blocks - num_evictable_hits:
                return None
            if computed:
                self.pool.touch(computed)
            new_blocks = self.pool.allocate(max(need, 0))
            blocks = self.req_blocks.setdefault(rid, blocks)
            blocks.extend(computed)
            blocks.extend(new_blocks)
        if self.enable_caching:
            start = self.num_cached_blocks.get(rid, 0)
            if total // self.block_size > start:
                # Blocks that will be full of computed tokens after this step become shareable.
                self._update_hashes(request)
                num_full = min(total // self.block_size, len(request.block_hashes))
                for i in range(start, num_full):
                    self.pool.cache_block(blocks[i], request.block_hashes[i])
                self.num_cached_blocks[rid] = max(start, num_full)
        return new_blocks

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.num_cached_blocks.pop(request.request_id, None)
        self.pool.release(list(reversed(blocks)))

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, [])]
