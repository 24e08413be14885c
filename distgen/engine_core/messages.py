"""Messages between the front end and the engine core (msgspec Structs, msgpack on the wire).

Front end -> engine core: one :data:`EngineCoreInput` per message (add, abort, shutdown).
Engine core -> front end: :class:`EngineCoreReady` once (the startup handshake), then one
:class:`EngineCoreOutputs` per step; an ``EngineCoreOutputs`` with ``error`` set is the last one.
"""

from __future__ import annotations

import msgspec

from distgen.sampling_spec import SamplingSpec


class EngineCoreRequest(msgspec.Struct, tag="add", array_like=True, omit_defaults=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingSpec  # resolved and checked by the front end
    arrival_time: float
    priority: int = 0  # lower first, under the priority scheduling policy


class EngineCoreAbort(msgspec.Struct, tag="abort", array_like=True):
    request_ids: list[str]


class EngineCoreShutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class EngineCoreGetStats(msgspec.Struct, tag="get_stats", array_like=True):
    """Ask for the scheduler's stats now; answered by an ``EngineCoreOutputs`` with ``stats_reply``."""


EngineCoreInput = EngineCoreRequest | EngineCoreAbort | EngineCoreShutdown | EngineCoreGetStats


class EngineCoreReady(msgspec.Struct, tag="ready", array_like=True):
    """The handshake: what the front end needs to validate prompts without asking again."""

    num_blocks: int
    max_model_len: int
    vocab_size: int
    pid: int
    worker_pids: list[int] = []


class Logprobs(msgspec.Struct, array_like=True):
    """Per token: the ids (chosen token first, then the top-k), their logprobs, the chosen one's rank."""

    token_ids: list[list[int]]
    logprobs: list[list[float]]
    ranks: list[int]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    new_logprobs: Logprobs | None = None
    new_prompt_logprobs: Logprobs | None = None
    num_cached_tokens: int = 0


class SchedulerStatsMsg(msgspec.Struct, array_like=True):
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    recovering: bool = False  # a lost worker is being replaced: steps resume after the restart
    num_worker_restarts: int = 0
    num_recovered_requests: int = 0  # requests in flight at a restart, rescheduled by recomputation


class EngineCoreOutputs(msgspec.Struct, tag="outputs", array_like=True, omit_defaults=True):
    outputs: list[EngineCoreOutput] = []
    stats: SchedulerStatsMsg | None = None
    error: str | None = None  # set when the engine core died; every request is then failed
    error_type: str | None = None  # the exception's class name, to re-raise a startup error as itself
    stats_reply: bool = False  # the answer to EngineCoreGetStats


EngineCoreMessage = EngineCoreReady | EngineCoreOutputs
