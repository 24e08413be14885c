"""The worker's copy of each running request, kept in sync by the scheduler's step diffs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distgen.sampling_spec import SamplingSpec
from distgen.workers.scheduler_output import SchedulerOutput

PLACEHOLDER = -1  # a token id not known on the host yet


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt, then outputs
    num_prompt_tokens: int
    sampling_params: SamplingSpec
    block_ids: list[int]
    num_computed_tokens: int
    row: int = -1  # its row of RequestStates' block table
    # Tokens sampled on the device whose values the scheduler has not sent yet (async scheduling):
    # the last ``num_placeholders`` entries of token_ids are PLACEHOLDER until they arrive.
    num_placeholders: int = 0
    # Structured outputs (rank 0, see distgen.structured_output): the grammar matcher, how many output
    # tokens it has read, and whether it has failed.
    matcher: Any = None
    matcher_consumed: int = 0
    matcher_failed: bool = False
    # The same tokens split once, kept in step (read every step by the sampler's penalties).
    prompt_token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = self.token_ids[: self.num_prompt_tokens]
        self.output_token_ids = self.token_ids[self.num_prompt_tokens :]

    def append_tokens(self, token_ids: list[int]) -> None:
        """The scheduler's new tokens: they fill the placeholders first, oldest first."""
        if self.num_placeholders:
            k = min(self.num_placeholders, len(token_ids))
            start = len(self.token_ids) - self.num_placeholders
            self.token_ids[start : start + k] = token_ids[:k]
            start = len(self.output_token_ids) - self.num_placeholders
            self.output_token_ids[start : start + k] = token_ids[:k]
            self.num_placeholders -= k
            token_ids = token_ids[k:]
        self.token_ids.extend(token_ids)
        self.output_token_ids.extend(token_ids)

    def add_placeholder(self) -> None:
        """A token was sampled for this request on the device; its value comes in a later step."""
        self.token_ids.append(PLACEHOLDER)
        self.output_token_ids.append(PLACEHOLDER)
        self.num_placeholders += 1


class RequestStates(dict[str, CachedRequestState]):
    """req_id -> state; :meth:`apply` folds in one step's diff.

    Every request also owns a row of one persistent block table, written when it gets blocks, so a
    step gathers its rows' tables in one indexing operation instead of copying each list again.
    ``version`` changes whenever a request joins or leaves (or comes back after preemption), so
    anything derived from the set of requests can be cached for as long as it stays the same.
    """

    def __init__(self, max_blocks_per_seq: int) -> None:
        super().__init__()
        self.version = 0
        self._table = np.zeros((0, max_blocks_per_seq), dtype=np.int32)
        self._free_rows: list[int] = []

    def apply(self, sched: SchedulerOutput) -> None:
        if sched.new_reqs or sched.finished_req_ids:
            self.version += 1
        for rid in sched.finished_req_ids:
            self._drop(rid)
        for new in sched.new_reqs:
            self._drop(new.req_id)  # a preempted request comes back from scratch
            st = CachedRequestState(
                new.req_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                new.sampling_params,
                list(new.block_ids),
                new.num_computed_tokens,
                row=self._take_row(),
            )
            self._table[st.row, : len(st.block_ids)] = st.block_ids
            self[new.req_id] = st
        for c in sched.cached_reqs:
            st = self[c.req_id]
            st.append_tokens(c.new_token_ids)
            if c.new_block_ids:
                k = len(st.block_ids)
                st.block_ids.extend(c.new_block_ids)
                self._table[st.row, k : len(st.block_ids)] = c.new_block_ids
            st.num_computed_tokens = c.num_computed_tokens

    def block_table(self, rows: Sequence[CachedRequestState], width: int) -> np.ndarray:
        """``[len(rows), width]`` block ids of ``rows``; 0 past each row's own blocks."""
        index = np.fromiter((s.row for s in rows), dtype=np.intp, count=len(rows))
        return self._table[index, :width]

    def _take_row(self) -> int:
        if not self._free_rows:
            old = len(self._table)
            grown = np.zeros((max(2 * old, 64), self._table.shape[1]), dtype=np.int32)
            grown[:old] = self._table
            self._table = grown
            self._free_rows = list(range(len(grown) - 1, old - 1, -1))
        return self._free_rows.pop()

    def _drop(self, req_id: str) -> None:
        st = self.pop(req_id, None)
        if st is not None:
            self._table[st.row] = 0
            self._free_rows.append(st.row)
