"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

There are no separate prefill and decode phases: each step every running request asks for the
tokens it has not computed yet (one for a decoding request, a chunk of the prompt for a new one),
running requests first, then waiting ones, until the token budget or the sequence limit is spent.
When the KV cache runs out, the last running request is preempted: its blocks are freed and it
goes back to the waiting queue, to be recomputed later.

Two policies order the queues (``scheduling_policy``). ``fcfs``: arrival order; the last running
request is the most recently admitted, and a preempted one goes back to the head of the queue.
``priority``: by ``(priority, arrival time)``, lower first, in both queues: the waiting request
admitted next is the most urgent, and the running request preempted is the least urgent.

A step's tokens count as computed as soon as it is scheduled. With async scheduling the next step is
scheduled before the last one's sampled tokens are known: a request then asks for its pending token
(``Request.num_pending``), which the worker takes from the previous step's samples on the device.

Under pipeline parallelism up to ``pipeline_depth`` steps are in flight, one per stage: the running
requests are cut into that many micro-batches (a step takes at most its share of the unfinished
requests), and a request whose sampled token is still in the pipeline sits out until it arrives.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from distgen.config import CacheConfig, SchedulerConfig
from distgen.engine_core.kv_cache_manager import KVCacheManager
from distgen.engine_core.request import Request, RequestStatus
from distgen.engine_core.request_queue import make_queue, priority_key
from distgen.workers.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

logger = logging.getLogger("distgen")


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


class Scheduler:
    def __init__(
        self,
        sched_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        pipeline_depth: int = 1,
        long_prompt: int | None = None,
    ) -> None:
        """``long_prompt``: the prompt length past which the model rotates a request differently
        from its first token (LongRoPE), so that its KV blocks are cached apart."""
        self.config = sched_config
        self.pipeline_depth = pipeline_depth
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(
            num_blocks, cache_config.block_size, cache_config.enable_prefix_caching, long_prompt
        )
        self.requests: dict[str, Request] = {}
        self.waiting = make_queue(sched_config.policy)
        self.running: list[Request] = []  # priority policy: sorted by priority_key
        self._by_priority = sched_config.policy == "priority"
        self.finished_req_ids: list[str] = []  # to tell the workers at the next step
        self.num_preemptions = 0
        self.num_needing_host_tokens = 0  # unfinished requests with penalties (see Request)

    # -- queue management ------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.add(request)
        self.num_needing_host_tokens += request.needs_host_tokens

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests from outside the step (aborts, stop strings found by the front end)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            req.status = status
            self._finish(req)
            done.append(req)
        return done

    def _finish(self, req: Request) -> None:
        """Take a request that just got a finished status out of its queue and free it."""
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)  # waiting, or preempted while a step sampled its last token
        self.kv.free(req)
        self.requests.pop(req.request_id, None)
        self.finished_req_ids.append(req.request_id)
        self.num_needing_host_tokens -= req.needs_host_tokens

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- the step ---------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        num_scheduled: dict[str, int] = {}
        new_blocks: dict[str, list[int]] = {}
        new_reqs: list[Request] = []
        preempted = False
        # Pipelined: this step's micro-batch takes its share of the unfinished requests.
        seqs = (
            -(-len(self.requests) // self.pipeline_depth) if self.pipeline_depth > 1 else len(self.requests)
        )

        # 1. Running requests, oldest first; preempt from the back when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0 and len(num_scheduled) < seqs:
            req = self.running[i]
            if req.num_pending and (
                self.pipeline_depth > 1 or req.num_output_tokens + req.num_pending >= req.max_tokens
            ):
                i += 1  # its token is in the pipeline, or its last one is being sampled: wait for it
                continue
            n = min(req.num_tokens + req.num_pending - req.num_computed_tokens, budget)
            if n <= 0:  # all known tokens computed (should not happen between steps)
                i += 1
                continue
            while True:
                blocks = self.kv.allocate_slots(req, n)
                if blocks is not None:
                    break
                # The newest running request gives way; it sits after req, so nothing of it is
                # scheduled in this step yet.
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            if blocks is None:
                break
            num_scheduled[req.request_id] = n
            new_blocks[req.request_id] = [b.block_id for b in blocks]
            budget -= n
            i += 1

        # 2. Waiting requests, in the policy's order (preempted ones were put back in it).
        while (
            self.waiting
            and budget > 0
            and not preempted
            and len(self.running) < self.config.max_num_seqs
            and len(num_scheduled) < seqs
        ):
            req = self.waiting.peek()
            if req.num_pending:  # preempted while a step sampled for it: wait for that token
                break
            computed, num_hit = self.kv.get_computed_blocks(req)
            n = req.num_tokens - num_hit
            if n > budget and not self.config.enable_chunked_prefill:
                break
            n = min(n, budget)
            blocks = self.kv.allocate_slots(req, n, computed)
            if blocks is None:
                break
            self.waiting.pop()
            if req.num_cached_tokens < 0:  # first admission: count it for the prefix-cache stats
                req.num_cached_tokens = num_hit
                self.kv.pool.num_queries += req.num_tokens
                self.kv.pool.num_hits += num_hit
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if self._by_priority:  # the least urgent stays last, the one to preempt
                self.running.insert(bisect.bisect(self.running, priority_key(req), key=priority_key), req)
            else:
                self.running.append(req)
            new_reqs.append(req)
            num_scheduled[req.request_id] = n
            budget -= n

        return self._make_output(num_scheduled, new_blocks, new_reqs)

    def requeue_all(self) -> int:
        """The workers were lost, and every KV block with them: each unfinished request goes back to
        the waiting queue (oldest first) to be recomputed from its prompt and the tokens it has, and
        the prefix cache is emptied. Steps in flight never answer: no token is pending. Returns how
        many requests there are."""
        for req in reversed(self.running):  # put_back adds at the head: the oldest ends up first
            self._requeue(req)
        self.running.clear()
        for req in self.requests.values():
            req.num_pending = 0
        self.finished_req_ids.clear()
        self.kv.pool.reset_prefix_cache()
        return len(self.requests)

    def _preempt(self, req: Request) -> None:
        self._requeue(req)
        req.num_preemptions += 1
        self.num_preemptions += 1
        logger.debug("preempted %s (KV cache full)", req.request_id)

    def _requeue(self, req: Request) -> None:
        """A running request back to the head of the waiting queue, its blocks freed, to be
        recomputed (the caller takes it out of ``running``)."""
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.put_back(req)

    def _make_output(
        self, num_scheduled: dict[str, int], new_blocks: dict[str, list[int]], new_reqs: list[Request]
    ) -> SchedulerOutput:
        """The step's diff for the workers; then the step's tokens count as computed (``_scheduled``)."""
        new_ids = {r.request_id for r in new_reqs}
        new_data = []
        for req in new_reqs:
            new_data.append(
                NewRequestData(
                    req_id=req.request_id,
                    token_ids=list(req.all_token_ids),
                    num_prompt_tokens=req.num_prompt_tokens,
                    sampling_params=req.sampling_params,
                    block_ids=self.kv.block_ids(req.request_id),
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
            req.num_tokens_sent = req.num_tokens
            _scheduled(req, num_scheduled[req.request_id])
        cached_data = []
        for req in self.running:
            rid = req.request_id
            if rid in new_ids or rid not in num_scheduled:
                continue
            cached_data.append(
                CachedRequestData(
                    req_id=rid,
                    new_token_ids=req.all_token_ids[req.num_tokens_sent :],
                    new_block_ids=new_blocks.get(rid, []),
                    num_computed_tokens=req.num_computed_tokens,
                )
            )
            req.num_tokens_sent = req.num_tokens
            _scheduled(req, num_scheduled[rid])
        finished, self.finished_req_ids = self.finished_req_ids, []
        return SchedulerOutput(
            new_reqs=new_data,
            cached_reqs=cached_data,
            num_scheduled_tokens=num_scheduled,
            total_num_scheduled_tokens=sum(num_scheduled.values()),
            finished_req_ids=finished,
        )

    def update_from_output(self, sched: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Append the step's sampled tokens and apply the stop and length rules.

        Returns the requests that received a token (finished or not). A request preempted since the
        step was scheduled keeps its token; one that ended meanwhile (aborted, or stopped by the
        token before) drops it.
        """
        out = []
        for rid in sched.num_scheduled_tokens:
            token = sampled.get(rid)
            if token is None:
                continue  # a partial prefill chunk: nothing sampled yet
            req = self.requests.get(rid)
            if req is None:  # ended meanwhile (ended requests leave ``requests`` at once)
                continue
            req.num_pending -= 1
            req.append_output_token(token)
            if req.check_stop():
                self._finish(req)
            out.append(req)
        return out

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=self.kv.usage,
            prefix_cache_queries=self.kv.pool.num_queries,
            prefix_cache_hits=self.kv.pool.num_hits,
            num_preemptions=self.num_preemptions,
        )


def _scheduled(req: Request, n: int) -> None:
    """``n`` more tokens of ``req`` count as computed; if that reaches its last known (or pending)
    token, the step samples its next one, pending until the step's output comes back."""
    req.num_computed_tokens += n
    if req.num_computed_tokens == req.num_tokens_sent + req.num_pending:
        req.num_pending += 1
