"""What the scheduler tells the workers each step: a diff against what they already hold.

These Structs cross the engine-core -> worker boundary, so they are msgspec Structs.
"""

from __future__ import annotations

import msgspec

from distgen.sampling_spec import SamplingSpec


class NewRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the workers have not seen (or must rebuild after preemption)."""

    req_id: str
    token_ids: list[int]  # every known token: prompt, then outputs so far
    num_prompt_tokens: int
    sampling_params: SamplingSpec
    block_ids: list[int]
    num_computed_tokens: int


class CachedRequestData(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the workers hold: only what changed since the last step."""

    req_id: str
    new_token_ids: list[int]
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: list[str] = []  # workers drop their state for these

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


class ModelRunnerOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What rank 0 answers after a step: one sampled token per request that reached its end."""

    req_ids: list[str]
    sampled_token_ids: list[int]
    # Per sampled row, when any request asked for logprobs: [sampled, top-1, ..., top-k] ids,
    # their logprobs, and the sampled token's rank.
    logprob_token_ids: list[list[int]] | None = None
    logprobs: list[list[float]] | None = None
    sampled_ranks: list[int] | None = None
    # req_id -> per prompt position computed this step: ([ids], [logprobs], rank of the actual token)
    prompt_logprobs: dict[str, list[tuple[list[int], list[float], int]]] = {}
