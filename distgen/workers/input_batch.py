"""The worker's copy of each running request, kept in sync by the scheduler's step diffs."""

from __future__ import annotations

from dataclasses import dataclass, field

from distgen.core.scheduler_output import SchedulerOutput
from distgen.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    req_id: str
    token_ids: list[int]  # prompt, then outputs
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    # The same tokens split once, kept in step (read every step by the sampler's penalties).
    prompt_token_ids: list[int] = field(init=False)
    output_token_ids: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_token_ids = self.token_ids[: self.num_prompt_tokens]
        self.output_token_ids = self.token_ids[self.num_prompt_tokens :]

    def append_tokens(self, token_ids: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.output_token_ids.extend(token_ids)


class RequestStates(dict[str, CachedRequestState]):
    """req_id -> state; :meth:`apply` folds in one step's diff.

    ``version`` changes whenever a request joins or leaves (or comes back after preemption), so
    anything derived from the set of requests can be cached for as long as it stays the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def apply(self, sched: SchedulerOutput) -> None:
        if sched.new_reqs or sched.finished_req_ids:
            self.version += 1
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
            st.append_tokens(c.new_token_ids)
            st.block_ids.extend(c.new_block_ids)
            st.num_computed_tokens = c.num_computed_tokens
