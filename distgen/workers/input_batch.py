"""The worker's copy of each running request, kept in sync by the scheduler's step diffs."""

from __future__ import annotations

from dataclasses import dataclass

from distgen.core.scheduler_output import SchedulerOutput
from distgen.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


class RequestStates(dict[str, CachedRequestState]):
    """req_id -> state; :meth:`apply` folds in one step's diff."""

    def apply(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self.pop(rid, None)
        for new in sched.new_reqs:
            self[new.req_id] = CachedRequestState(
                new.req_id,
                list(new.token_ids),
                new.num_prompt_tokens,
                new.sampling_params,
                list(new.block_ids),
                new.num_computed_tokens,
            )
        for c in sched.cached_reqs:
            st = self[c.req_id]
            st.token_ids.extend(c.new_token_ids)
            st.block_ids.extend(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens
