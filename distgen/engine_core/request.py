"""A request as the engine core sees it: token ids, progress and status, never text."""

from __future__ import annotations

import enum
import itertools
import time

from distgen.sampling_spec import SamplingSpec


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


_order = itertools.count()  # ties between equal arrival times (an n > 1 request's children)


class Request:
    """One sequence being generated. ``num_computed_tokens`` counts tokens whose KV is in the cache
    once the steps scheduled so far have run; ``num_pending`` tokens have been sampled by a step that
    is still running (async scheduling) and are not in ``all_token_ids`` yet."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingSpec,
        max_tokens: int,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.priority = priority  # lower first, under the priority scheduling policy
        self.seq = next(_order)
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.max_tokens = max_tokens
        self.arrival_time = time.time() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_pending = 0
        self.num_cached_tokens = -1  # prefix-cache hits at first scheduling (-1: not yet)
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.block_hashes: list[int] = []  # hash chain over the full blocks of all_token_ids
        self.stop_token_ids = sampling_params.all_stop_token_ids
        # How many of all_token_ids the workers already hold (for diff-based step messages).
        self.num_tokens_sent = 0
        # Prompt positions whose logprobs went out: a prefill recomputed after a preemption scores
        # them again, and must not report them twice.
        self.num_prompt_logprobs_sent = 0

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def needs_host_tokens(self) -> bool:
        """Penalties, multi-token bad words and grammars read earlier output tokens on the host, so
        the next step cannot be scheduled before the previous one's token is known."""
        p = self.sampling_params
        return (
            p.presence_penalty != 0.0
            or p.frequency_penalty != 0.0
            or p.repetition_penalty != 1.0
            or any(len(seq) > 1 for seq in p.bad_words_token_ids)
            or p.grammar is not None
        )

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status >= RequestStatus.FINISHED_STOPPED  # the FINISHED_* statuses come last

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self) -> bool:
        """Apply length and stop-token rules after a new token, in vLLM's order; set status and
        return True if finished. An EOS on the last allowed token counts as "length", as in vLLM."""
        params = self.sampling_params
        n = len(self.output_token_ids)
        if n >= self.max_tokens:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        if n < params.min_tokens and params.grammar is None:
            # (The sampler blocks stop tokens below min_tokens; one that comes anyway from a request
            # with structured outputs is its grammar's end, which wins.)
            return False
        last = self.output_token_ids[-1]
        if last in self.stop_token_ids:
            self.status = RequestStatus.FINISHED_STOPPED
            is_eos = not params.ignore_eos and last in params.eos_token_ids
            self.stop_reason = None if is_eos else last
            return True
        return False

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens})"
        )
