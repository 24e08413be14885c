"""The engine core: scheduler + executor, one step at a time. It sees token ids, never text."""

from __future__ import annotations

import gc
import logging
import time
from collections import deque

from distgen.config import EngineConfig
from distgen.engine_core.messages import (
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    Logprobs,
    SchedulerStatsMsg,
)
from distgen.engine_core.request import FINISH_REASONS, Request, RequestStatus
from distgen.engine_core.scheduler import Scheduler
from distgen.exceptions import EngineDeadError
from distgen.executor.base import Executor, PendingOutput
from distgen.prompt_checks import validate_prompt
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("distgen")


class RestartBudget:
    """At most ``limit`` restarts in any ``window_s`` seconds."""

    def __init__(self, limit: int, window_s: float, clock=time.monotonic) -> None:
        self.limit, self.window_s, self._clock = limit, window_s, clock
        self._times: deque[float] = deque()

    def take(self) -> bool:
        now = self._clock()
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        par = config.parallel
        self.restarts = RestartBudget(par.max_worker_restarts, par.worker_restart_window_s)
        self._restart_due = False  # a worker was lost: the next step first replaces the workers
        self.num_worker_restarts = self.num_recovered_requests = 0
        self.last_restart_s = 0.0  # how long the last restart took
        self.executor = Executor.create(config)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.executor.init_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.num_blocks = num_blocks
        # A sequence longer than the whole cache could never be scheduled: cap the length.
        capacity = num_blocks * config.cache.block_size
        self.max_model_len = min(config.model.max_model_len, capacity)
        if self.max_model_len < config.model.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len=%d: sequences are capped "
                "at %d tokens (raise kv_cache_memory to allow more)",
                capacity,
                config.model.max_model_len,
                capacity,
            )
        # Pipeline parallelism: one step in flight per stage, each a micro-batch of its own.
        self.pipeline_depth = par.pipeline_parallel_size
        self.scheduler = Scheduler(
            config.scheduler,
            config.cache,
            num_blocks,
            self.max_model_len,
            self.pipeline_depth,
            config.model.long_rope_original,
        )
        self._aborted_outputs: list[EngineCoreOutput] = []
        # Async scheduling: launched steps whose outputs are not collected yet, oldest first.
        self._in_flight: deque[tuple[SchedulerOutput, PendingOutput]] = deque()
        # What start-up left alive (the model and its modules when the workers run in this process, the
        # tokenizer's tables where the front end does) moves to the permanent generation: the cyclic
        # collections that the steps' allocations trigger then scan only the steps' own objects.
        gc.freeze()

    # -- requests in ------------------------------------------------------------------------
    def validate_request(self, req: EngineCoreRequest) -> None:
        # The last-line guard, not a second front-end check: the front end's input processor has
        # checked the prompt, but a request that reaches the core unchecked (another client of its
        # socket, a hand-made prompt the front end trusted) would index the embedding out of its range
        # on the workers, or be scheduled with no room to generate, and take the engine down for every
        # client; refused here, it ends alone (its output says "abort").
        validate_prompt(req.prompt_token_ids, self.max_model_len, self.config.model.vocab_size)

    def add_request(self, req: EngineCoreRequest) -> None:
        self.validate_request(req)
        n, limit = len(req.prompt_token_ids), self.max_model_len
        params = req.sampling_params
        max_tokens = limit - n if params.max_tokens is None else min(params.max_tokens, limit - n)
        self.scheduler.add_request(
            Request(req.request_id, req.prompt_token_ids, params, max_tokens, req.arrival_time, req.priority)
        )

    def abort_requests(self, request_ids: list[str]) -> None:
        for req in self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED):
            self._aborted_outputs.append(EngineCoreOutput(req.request_id, [], finish_reason="abort"))

    def reject_request(self, request_id: str) -> None:
        """End a request that never entered the scheduler (its outputs say "abort")."""
        self._aborted_outputs.append(EngineCoreOutput(request_id, [], finish_reason="abort"))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def has_work(self) -> bool:
        """Requests to run, steps to collect, abort notices still to hand out, or a restart due."""
        pending = self._aborted_outputs or self._in_flight or self._restart_due
        return bool(pending) or self.scheduler.has_unfinished()

    @property
    def worker_pids(self) -> list[int]:
        return [p for p in getattr(self.executor, "worker_pids", []) if p is not None]

    # -- the step ----------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        if self._restart_due:
            self._restart_workers()
        outputs, self._aborted_outputs = self._aborted_outputs, []
        try:
            if self.pipeline_depth > 1:
                self._step_pipelined(outputs)
            elif self.config.scheduler.async_scheduling:
                self._step_ahead(outputs)
            elif self.scheduler.has_unfinished():
                sched = self.scheduler.schedule()
                outputs.extend(self._make_outputs(sched, self.executor.execute_model(sched)))
        except EngineDeadError as e:
            if not self._recoverable(e):
                raise
            self._restart_due = True  # the restart runs at the next call: first the front end hears of it
        return EngineCoreOutputs(outputs=outputs, stats=self.stats())

    def _recoverable(self, e: EngineDeadError) -> bool:
        """A lost worker (mp or ray) is replaced while the restart budget lasts."""
        if not self.executor.restartable or not self.restarts.take():
            return False
        logger.error("%s\nrestarting the workers (%d restarts so far)", e, self.num_worker_restarts)
        return True

    def _restart_workers(self) -> None:
        """New workers for the lost ones, the KV cache rebuilt at its size, and every request in
        flight rescheduled: recomputed from its prompt and the tokens it already has, so its stream
        goes on where it stopped (a seeded request's generator is a function of its position)."""
        t0 = time.monotonic()
        self._restart_due = False
        self._in_flight.clear()  # launched steps of the lost workers: they never answer
        self.executor.shutdown()
        num_requests = self.scheduler.requeue_all()
        self.executor = Executor.create(self.config)
        try:
            available = self.executor.determine_num_blocks()
            if available < self.num_blocks:
                raise EngineDeadError(
                    f"the engine is dead: the restarted workers have room for {available} KV blocks, "
                    f"fewer than the {self.num_blocks} the engine runs with"
                )
            self.executor.init_kv_cache(self.num_blocks)
        except BaseException:
            self.executor.shutdown()
            raise
        self.num_worker_restarts += 1
        self.num_recovered_requests += num_requests
        self.last_restart_s = time.monotonic() - t0
        logger.warning(
            "workers restarted in %.1fs; %d request(s) rescheduled", self.last_restart_s, num_requests
        )

    def _step_ahead(self, outputs: list[EngineCoreOutput]) -> None:
        """Async scheduling: launch step n+1, then collect step n, so the host's work on both
        overlaps the GPU's on n+1. Outputs lag one call behind the launches; each collected step's
        go into ``outputs`` at once, so that a failure on a later one loses none of them."""
        # Penalties read the last token on the host: with such a request, steps go one at a time.
        one_at_a_time = self.scheduler.num_needing_host_tokens > 0
        running_ahead = False
        if self.scheduler.has_unfinished() and not (self._in_flight and one_at_a_time):
            sched = self.scheduler.schedule()
            self._in_flight.append((sched, self.executor.submit(sched)))
            running_ahead = not (sched.is_empty or one_at_a_time)
        while self._in_flight and (len(self._in_flight) > 1 or not running_ahead):
            self._collect_oldest(outputs)

    def _step_pipelined(self, outputs: list[EngineCoreOutput]) -> None:
        """Pipeline parallelism: launch micro-batches until every stage has one, then collect the
        oldest, so that stage s works on step n while stage s+1 works on step n-1. When nothing more
        can be launched (every request in flight), collect one step and schedule again."""
        launched = False
        if len(self._in_flight) < self.pipeline_depth and self.scheduler.has_unfinished():
            sched = self.scheduler.schedule()
            if not sched.is_empty or sched.finished_req_ids:  # the workers still hear of finished ones
                self._in_flight.append((sched, self.executor.submit(sched)))
                launched = not sched.is_empty
        if self._in_flight and (len(self._in_flight) >= self.pipeline_depth or not launched):
            self._collect_oldest(outputs)

    def _collect_oldest(self, outputs: list[EngineCoreOutput]) -> None:
        sched, pending = self._in_flight[0]
        result = pending.get()
        self._in_flight.popleft()
        outputs.extend(self._make_outputs(sched, result))

    def _make_outputs(self, sched, result: ModelRunnerOutput) -> list[EngineCoreOutput]:
        sampled = dict(zip(result.req_ids, result.sampled_token_ids))
        row = {rid: i for i, rid in enumerate(result.req_ids)}
        prompt_lps = {}
        if result.prompt_logprobs:
            prompt_lps = self._new_prompt_logprobs(sched, result.prompt_logprobs)
        updated = self.scheduler.update_from_output(sched, sampled)
        outs = []
        for req in updated:
            out = EngineCoreOutput(
                req.request_id, [req.output_token_ids[-1]], num_cached_tokens=max(req.num_cached_tokens, 0)
            )
            if req.is_finished:
                out.finish_reason = FINISH_REASONS[req.status]
                out.stop_reason = req.stop_reason
            if result.logprobs is not None and req.sampling_params.logprobs is not None:
                i, k = row[req.request_id], req.sampling_params.logprobs
                out.new_logprobs = Logprobs(
                    [result.logprob_token_ids[i][: k + 1]],
                    [result.logprobs[i][: k + 1]],
                    [result.sampled_ranks[i]],
                )
            plp = prompt_lps.get(req.request_id)
            if plp is not None:
                out.new_prompt_logprobs = _prompt_lp(plp)
            outs.append(out)
        # Prompt logprobs of chunks that did not sample yet still travel with an empty token list.
        for rid, plp in prompt_lps.items():
            if rid not in sampled and plp:
                outs.append(EngineCoreOutput(rid, [], new_prompt_logprobs=_prompt_lp(plp)))
        return outs

    def _new_prompt_logprobs(self, sched: SchedulerOutput, computed: dict[str, list]) -> dict[str, list]:
        """The step's prompt logprobs that were not reported before, per request. The step computed
        them from each chunk's start on; a prefill recomputed after a preemption repeats positions
        already sent. (Read before the step's outputs end any request.)"""
        starts = {d.req_id: d.num_computed_tokens for d in (*sched.new_reqs, *sched.cached_reqs)}
        fresh = {}
        for rid, plp in computed.items():
            req = self.scheduler.requests.get(rid)
            if req is None:  # ended meanwhile: its outputs are dropped
                continue
            start = starts[rid]
            fresh[rid] = plp[max(0, req.num_prompt_logprobs_sent - start) :]
            req.num_prompt_logprobs_sent = max(req.num_prompt_logprobs_sent, start + len(plp))
        return fresh

    def stats(self) -> SchedulerStatsMsg:
        s = self.scheduler.stats()
        return SchedulerStatsMsg(
            s.num_running,
            s.num_waiting,
            s.kv_cache_usage,
            s.prefix_cache_queries,
            s.prefix_cache_hits,
            s.num_preemptions,
            self._restart_due,
            self.num_worker_restarts,
            self.num_recovered_requests,
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
        # Frozen objects are never collected: give them back, or libraries that count their instances
        # at interpreter exit (Triton's nanobind bindings) report them as leaked.
        gc.unfreeze()


def _prompt_lp(plp: list) -> Logprobs:
    return Logprobs([p[0] for p in plp], [p[1] for p in plp], [p[2] for p in plp])
