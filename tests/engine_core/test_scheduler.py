"""Scheduler driven directly, with a fake worker standing in for the model (CPU only, no model).

The fake worker rebuilds its per-request state only from the SchedulerOutput diffs, as the real workers
do, and keeps a fake paged KV cache: each slot it writes holds a key of (position, whole prefix up to that
position). Before "attending" it checks that every context slot of a scheduled request holds the key its
own tokens call for, so a prefix-cache hit on a block that was never computed, a block shared by two
requests that disagree on its content, or a wrong diff (token ids, block ids, computed count) all fail.

Like the real worker with async scheduling, the fake one keeps each token it samples at once; the
scheduler's later diff must repeat it. ``Sim(ahead=True)`` drives the scheduler as the engine core does
with async scheduling: step n+1 is scheduled and run before step n's tokens reach the scheduler.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable

import pytest

from distgen.config import CacheConfig, SchedulerConfig
from distgen.engine_core.request import Request, RequestStatus
from distgen.engine_core.request_queue import priority_key
from distgen.engine_core.scheduler import Scheduler
from distgen.sampling_params import SamplingParams
from distgen.sampling_spec import SamplingSpec
from distgen.workers.scheduler_output import SchedulerOutput

EOS = 2


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    max_num_seqs: int = 16,
    max_batched: int = 64,
    chunked: bool = True,
    caching: bool = True,
    policy: str = "fcfs",
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_batched,
            enable_chunked_prefill=chunked,
            policy=policy,
        ),
        CacheConfig(block_size=block_size, enable_prefix_caching=caching, num_blocks=num_blocks),
        num_blocks,
        max_model_len=4096,
    )


def make_request(
    rid: str,
    prompt: list[int],
    max_tokens: int = 8,
    eos: tuple[int, ...] = (EOS,),
    priority: int = 0,
    arrival: float | None = None,
    **params,
) -> Request:
    sp = SamplingSpec.from_params(SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=list(eos))
    return Request(rid, prompt, sp, max_tokens, arrival, priority)


class _WorkerReq:
    def __init__(self, tokens: list[int], block_ids: list[int], num_computed: int) -> None:
        self.tokens: list[int] = []
        self.keys: list[int] = []
        self.block_ids = list(block_ids)
        self.num_computed = num_computed
        self.unconfirmed = 0  # the last tokens: sampled here, not yet repeated by the scheduler
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.keys.append(hash((self.keys[-1] if self.keys else None, t)))
            self.tokens.append(t)


class FakeWorker:
    """Applies SchedulerOutput diffs, writes/reads a fake paged KV cache and 'samples' tokens."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.kv: list[int | None] = [None] * (num_blocks * block_size)
        self.reqs: dict[str, _WorkerReq] = {}
        self.seen_new: list = []  # every NewRequestData received, in order
        self.penalized: dict[str, bool] = {}
        self.num_context_checks = 0

    def slot(self, st: _WorkerReq, pos: int) -> int:
        assert pos // self.bs < len(st.block_ids), "token position beyond the request's block table"
        return st.block_ids[pos // self.bs] * self.bs + pos % self.bs

    def execute(self, out: SchedulerOutput, choose: Callable[[str, list[int]], int]) -> dict[str, int]:
        for rid in out.finished_req_ids:
            self.reqs.pop(rid, None)
        new_ids = set()
        for nr in out.new_reqs:
            assert nr.num_computed_tokens % self.bs == 0
            assert nr.num_computed_tokens < len(nr.token_ids)
            self.reqs[nr.req_id] = _WorkerReq(nr.token_ids, nr.block_ids, nr.num_computed_tokens)
            p = nr.sampling_params
            self.penalized[nr.req_id] = p.presence_penalty != 0 or p.repetition_penalty != 1
            self.seen_new.append(nr)
            new_ids.add(nr.req_id)
        cached_ids = set()
        for cr in out.cached_reqs:
            st = self.reqs[cr.req_id]
            assert cr.num_computed_tokens == st.num_computed, "workers and scheduler disagree on progress"
            k = min(st.unconfirmed, len(cr.new_token_ids))
            start = len(st.tokens) - st.unconfirmed
            assert cr.new_token_ids[:k] == st.tokens[start : start + k], "not the tokens the worker sampled"
            st.unconfirmed -= k
            st.extend(cr.new_token_ids[k:])
            st.block_ids.extend(cr.new_block_ids)
            cached_ids.add(cr.req_id)
        assert not new_ids & cached_ids
        assert set(out.num_scheduled_tokens) == new_ids | cached_ids
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())

        # Like each attention layer: write this step's K/V for every request, then read the contexts.
        for rid, n in out.num_scheduled_tokens.items():
            st = self.reqs[rid]
            assert n >= 1
            if self.penalized.get(rid):  # penalties read every earlier token: all must be confirmed
                assert st.unconfirmed == 0, f"{rid}: a penalized step ran before its last token was known"
            assert st.num_computed + n <= len(st.tokens), "scheduled tokens the worker does not know"
            for pos in range(st.num_computed, st.num_computed + n):
                self.kv[self.slot(st, pos)] = st.keys[pos]
        sampled = {}
        for rid, n in out.num_scheduled_tokens.items():
            st = self.reqs[rid]
            end = st.num_computed + n
            for pos in range(end):
                assert self.kv[self.slot(st, pos)] == st.keys[pos], f"{rid}: stale KV at position {pos}"
            self.num_context_checks += 1
            st.num_computed = end
            if end == len(st.tokens):
                sampled[rid] = choose(rid, st.tokens)
                st.extend([sampled[rid]])
                st.unconfirmed += 1
        return sampled


class Sim:
    """Scheduler + fake worker; ``step`` runs one engine step and checks the invariants around it.

    With ``ahead`` it steps as the engine core does with async scheduling: schedule and run step n+1,
    then hand step n's tokens to the scheduler (one step stays in flight; with a penalized request
    among the unfinished ones, steps go one at a time)."""

    def __init__(
        self, sched: Scheduler, choose: Callable[[str, list[int]], int] | None = None, ahead: bool = False
    ) -> None:
        self.s = sched
        self.w = FakeWorker(sched.kv.pool.num_blocks, sched.kv.block_size)
        self.choose = choose or (lambda rid, tokens: 10 + len(tokens) % 50)
        self.finished: dict[str, Request] = {}
        self.outputs: list[SchedulerOutput] = []
        self.ahead = ahead
        self.in_flight: deque[tuple[SchedulerOutput, dict[str, int]]] = deque()
        self.events: Counter[str] = Counter()  # what happened to tokens that arrived late

    def add(self, req: Request) -> Request:
        self.s.add_request(req)
        return req

    @property
    def busy(self) -> bool:
        return self.s.has_unfinished() or bool(self.in_flight)

    def step(
        self, between: Callable[[SchedulerOutput], None] | None = None
    ) -> tuple[SchedulerOutput | None, dict[str, int]]:
        """One engine step; ``between`` runs after schedule() and before the model (e.g. an abort).
        Returns the step scheduled now (None if none could be) and what the model sampled for it."""
        one_at_a_time = self.s.num_needing_host_tokens > 0
        running_ahead, result = False, (None, {})
        if not (self.in_flight and one_at_a_time):
            result = self._launch(between)
            running_ahead = not (result[0].is_empty or one_at_a_time)
        while self.in_flight and (not self.ahead or len(self.in_flight) > 1 or not running_ahead):
            self._collect(*self.in_flight.popleft())
        return result

    def _launch(self, between) -> tuple[SchedulerOutput, dict[str, int]]:
        s = self.s
        pending_before = {rid: r.num_pending for rid, r in s.requests.items()}
        out = s.schedule()
        self.outputs.append(out)
        check_invariants(s)
        cfg = s.config
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        assert len(out.num_scheduled_tokens) <= cfg.max_num_seqs
        for rid in out.num_scheduled_tokens:
            req = s.requests[rid]
            assert req.status == RequestStatus.RUNNING
            # A step's tokens count as computed once scheduled; at most the pending token is unknown.
            assert req.num_computed_tokens <= req.num_tokens + pending_before[rid]
            assert len(s.kv.req_blocks[rid]) * s.kv.block_size >= req.num_computed_tokens
            assert req.num_output_tokens + req.num_pending <= req.max_tokens
        # The model samples exactly for the requests the scheduler expects a token from.
        expect = {
            rid for rid in out.num_scheduled_tokens if s.requests[rid].num_pending > pending_before[rid]
        }
        if between is not None:
            between(out)
            check_invariants(s)
        gone = set(out.num_scheduled_tokens) - set(s.requests)  # finished while the step was out
        sampled = self.w.execute(out, self.choose)
        assert set(sampled) == expect
        for rid in set(out.num_scheduled_tokens) - gone:  # the diffs rebuilt the scheduler's view exactly
            req, st = s.requests[rid], self.w.reqs[rid]
            assert st.tokens[: req.num_tokens] == req.all_token_ids
            assert len(st.tokens) == req.num_tokens + req.num_pending
            assert st.block_ids == s.kv.block_ids(rid)
        self.in_flight.append((out, sampled))
        return out, sampled

    def _collect(self, out: SchedulerOutput, sampled: dict[str, int]) -> None:
        s = self.s
        gone = set(out.num_scheduled_tokens) - set(s.requests)  # aborted, or ended by an earlier token
        preempted = {
            rid for rid in sampled if rid in s.requests and s.requests[rid].status != RequestStatus.RUNNING
        }
        updated = s.update_from_output(out, sampled)
        assert {r.request_id for r in updated} == set(sampled) - gone
        self.events["dropped"] += len(set(sampled) & gone)
        self.events["kept by a preempted request"] += len(preempted)
        for r in updated:
            if r.is_finished:
                self.finished[r.request_id] = r
        check_invariants(s)

    def run(self, max_steps: int = 2000) -> int:
        steps = 0
        while self.busy:
            self.step()
            steps += 1
            assert steps < max_steps, "no progress"
        return steps

    def drain(self) -> SchedulerOutput:
        """One more step so that the last finished ids reach the worker."""
        out = self.s.schedule()
        assert out.is_empty
        self.w.execute(out, self.choose)
        return out


def check_invariants(s: Scheduler) -> None:
    kv, pool = s.kv, s.kv.pool
    holders: Counter[int] = Counter()
    for rid, blocks in kv.req_blocks.items():
        assert rid in s.requests and s.requests[rid].status == RequestStatus.RUNNING
        assert len({b.block_id for b in blocks}) == len(blocks), f"{rid} holds a block twice"
        holders.update(b.block_id for b in blocks)
    for b in pool.blocks:
        assert b.ref_cnt == holders[b.block_id], f"{b}: {holders[b.block_id]} holders"
        assert (b.ref_cnt == 0) == (b.block_id in pool.free)
    assert pool.num_free_blocks + sum(1 for b in pool.blocks if b.ref_cnt > 0) == pool.num_blocks
    # A block held by several requests is a prefix-cache share: same full block, same position, same chain.
    for rid, blocks in kv.req_blocks.items():
        req = s.requests[rid]
        for i, b in enumerate(blocks):
            if holders[b.block_id] > 1:
                assert b.block_hash is not None
                assert i < len(req.block_hashes) and req.block_hashes[i] == b.block_hash
    for h, b in pool.cached.items():
        assert b.block_hash == h
    # Queue bookkeeping.
    running, waiting = [r.request_id for r in s.running], [r.request_id for r in s.waiting]
    assert len(set(running + waiting)) == len(running) + len(waiting)
    assert set(running) | set(waiting) == set(s.requests)
    assert len(s.running) <= s.config.max_num_seqs
    for r in s.waiting:
        assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
        assert r.request_id not in kv.req_blocks
    for r in s.running:
        assert r.status == RequestStatus.RUNNING
        assert r.request_id in kv.req_blocks
    if s.config.policy == "priority":  # both queues in (priority, arrival) order
        for queue in (list(s.running), list(s.waiting)):
            keys = [priority_key(r) for r in queue]
            assert keys == sorted(keys)


def assert_no_leaks(sim: Sim) -> None:
    s = sim.s
    pool = s.kv.pool
    assert all(b.ref_cnt == 0 for b in pool.blocks)
    assert pool.num_free_blocks == pool.num_blocks
    assert s.requests == {} and not s.running and not s.waiting
    assert s.kv.req_blocks == {} and s.kv.num_cached_blocks == {}
    assert not s.has_unfinished()
    sim.drain()
    assert sim.w.reqs == {}, "workers still hold finished requests"
    assert s.finished_req_ids == []


# -- budget, chunking, ordering ---------------------------------------------------------------------


def test_token_budget_and_max_num_seqs_every_step():
    sim = Sim(make_scheduler(num_blocks=200, max_num_seqs=3, max_batched=10))
    for i in range(7):
        sim.add(make_request(f"r{i}", list(range(3 + 2 * i)), max_tokens=5))
    sim.run()
    for out in sim.outputs:
        assert out.total_num_scheduled_tokens <= 10
        assert len(out.num_scheduled_tokens) <= 3
    assert max(o.total_num_scheduled_tokens for o in sim.outputs) == 10  # the budget gets used
    assert max(len(o.num_scheduled_tokens) for o in sim.outputs) == 3
    assert all(len(r.output_token_ids) == 5 for r in sim.finished.values())
    assert len(sim.finished) == 7
    assert_no_leaks(sim)


def test_chunked_prefill_splits_a_long_prompt():
    sim = Sim(make_scheduler(num_blocks=64, max_batched=16))
    r = sim.add(make_request("long", list(range(50)), max_tokens=3))
    chunks = []
    while sim.s.has_unfinished():
        out, sampled = sim.step()
        chunks.append(out.num_scheduled_tokens["long"])
        if len(chunks) <= 3:
            assert sampled == {}  # partial prefill chunks sample nothing
    assert chunks == [16, 16, 16, 2, 1, 1]
    assert r.num_output_tokens == 3 and r.status == RequestStatus.FINISHED_LENGTH
    assert_no_leaks(sim)


def test_without_chunked_prefill_prompts_are_scheduled_whole():
    sim = Sim(make_scheduler(num_blocks=64, max_batched=16, chunked=False))
    sim.add(make_request("a", list(range(10)), max_tokens=2))
    sim.add(make_request("b", list(range(100, 110)), max_tokens=2))
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"a": 10}  # b does not fit in the 6 left: not chunked
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"a": 1, "b": 10}
    sim.run()
    assert_no_leaks(sim)


def test_decodes_are_scheduled_before_new_prefills():
    sim = Sim(make_scheduler(num_blocks=64, max_batched=5))
    for i in range(3):
        sim.add(make_request(f"d{i}", [i + 1], max_tokens=20))
    out, sampled = sim.step()  # three 1-token prompts: prefilled together
    assert set(sampled) == {"d0", "d1", "d2"}
    sim.add(make_request("p", list(range(100, 120)), max_tokens=2))
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"d0": 1, "d1": 1, "d2": 1, "p": 2}
    assert list(out.num_scheduled_tokens)[:3] == ["d0", "d1", "d2"]
    assert [n.req_id for n in out.new_reqs] == ["p"]
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"d0": 1, "d1": 1, "d2": 1, "p": 2}  # p keeps its chunk behind


def test_budget_spent_on_decodes_leaves_prefill_waiting():
    sim = Sim(make_scheduler(num_blocks=64, max_batched=3))
    for i in range(3):
        sim.add(make_request(f"d{i}", [i + 1], max_tokens=4))
    sim.step()
    sim.add(make_request("p", [7, 8, 9], max_tokens=1))
    out, _ = sim.step()
    assert out.num_scheduled_tokens == {"d0": 1, "d1": 1, "d2": 1}
    assert sim.s.waiting.peek().request_id == "p"
    sim.run()
    assert_no_leaks(sim)


def test_max_num_seqs_caps_admission():
    sim = Sim(make_scheduler(num_blocks=64, max_num_seqs=2, max_batched=100))
    for i in range(4):
        sim.add(make_request(f"r{i}", [i + 1, i + 2], max_tokens=3))
    out, _ = sim.step()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}
    assert [r.request_id for r in sim.s.waiting] == ["r2", "r3"]
    sim.run()
    assert len(sim.finished) == 4
    assert_no_leaks(sim)


def test_duplicate_request_id_rejected():
    s = make_scheduler(num_blocks=8)
    s.add_request(make_request("x", [1]))
    with pytest.raises(ValueError):
        s.add_request(make_request("x", [2]))


# -- prefix cache through the scheduler ------------------------------------------------------------


def test_second_request_with_same_prompt_starts_from_cache():
    sim = Sim(make_scheduler(num_blocks=64, block_size=4))
    prompt = list(range(30, 45))  # 15 tokens: 3 full blocks
    a = sim.add(make_request("a", prompt, max_tokens=5))
    sim.step()
    b = sim.add(make_request("b", prompt, max_tokens=2))
    out, _ = sim.step()
    (nb,) = out.new_reqs
    assert nb.req_id == "b" and nb.num_computed_tokens == 12
    assert out.num_scheduled_tokens["b"] == 3
    assert nb.block_ids[:3] == sim.s.kv.block_ids("a")[:3]
    assert b.num_cached_tokens == 12 and a.num_cached_tokens == 0
    st = sim.s.stats()
    assert st.prefix_cache_hits == 12 and st.prefix_cache_queries == 30
    sim.run()
    assert_no_leaks(sim)


# -- preemption -------------------------------------------------------------------------------------


def test_preemption_resends_full_request_and_everything_finishes():
    # 6 blocks of 4 tokens; three requests of 6 prompt tokens growing to 6 + 10 = 16 tokens (4 blocks) each.
    sim = Sim(make_scheduler(num_blocks=6, block_size=4, max_batched=64))
    reqs = [sim.add(make_request(f"r{i}", [i * 10 + j for j in range(6)], max_tokens=10)) for i in range(3)]
    sim.run()
    assert sim.s.num_preemptions > 0
    assert sim.s.stats().num_preemptions == sim.s.num_preemptions
    assert sum(r.num_preemptions for r in reqs) == sim.s.num_preemptions
    for r in reqs:
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 10
        assert r.all_token_ids == r.prompt_token_ids + r.output_token_ids
    # Every request was sent as new once, plus once per preemption; the re-sends carry prompt + outputs.
    by_id = Counter(n.req_id for n in sim.w.seen_new)
    assert by_id == {r.request_id: 1 + r.num_preemptions for r in reqs}
    resent = [n for n in sim.w.seen_new if len(n.token_ids) > n.num_prompt_tokens]
    assert resent, "a preempted request came back with its outputs"
    for n in resent:
        r = sim.finished[n.req_id]
        assert n.token_ids == r.all_token_ids[: len(n.token_ids)]
        assert n.num_prompt_tokens == 6
    assert_no_leaks(sim)


def test_preempted_request_resumes_from_its_cached_blocks():
    # 7 blocks of 4. a: 13 prompt tokens (4 blocks), b: 9 (3 blocks): the pool is full after step 1.
    # After step 4 b has 12 computed tokens (3 full, cached blocks); at step 5 a needs a 5th block and b,
    # the youngest, is preempted. Its blocks go to the free list last block first, a takes b's last
    # block, so b's first two blocks stay cached and b comes back with 8 computed tokens.
    sim = Sim(make_scheduler(num_blocks=7, block_size=4, max_batched=64))
    a = sim.add(make_request("a", list(range(100, 113)), max_tokens=8))
    b = sim.add(make_request("b", list(range(200, 209)), max_tokens=6))
    preempted_at = None
    while sim.s.has_unfinished():
        out, _ = sim.step()
        if preempted_at is None and b.num_preemptions:
            preempted_at = len(sim.outputs)
            assert "b" not in out.num_scheduled_tokens and "a" in out.num_scheduled_tokens
            assert b.status == RequestStatus.PREEMPTED and sim.s.waiting.peek() is b
            assert "b" not in sim.s.kv.req_blocks
            tokens_at_preemption = list(b.all_token_ids)
    assert preempted_at == 5 and a.num_preemptions == 0 and b.num_preemptions == 1
    first, resend = [n for n in sim.w.seen_new if n.req_id == "b"]
    assert first.token_ids == b.prompt_token_ids and first.num_computed_tokens == 0
    assert resend.token_ids == tokens_at_preemption == b.prompt_token_ids + b.output_token_ids[:4]
    assert resend.num_prompt_tokens == 9
    assert resend.num_computed_tokens == 8  # resumed from the prefix cache
    assert b.num_cached_tokens == 0  # the first admission's hit count is kept
    assert a.num_output_tokens == 8 and b.num_output_tokens == 6
    assert_no_leaks(sim)


def test_preemption_without_prefix_caching_recomputes_everything():
    sim = Sim(make_scheduler(num_blocks=6, block_size=4, caching=False))
    reqs = [sim.add(make_request(f"r{i}", [i * 10 + j for j in range(6)], max_tokens=10)) for i in range(3)]
    sim.run()
    assert sim.s.num_preemptions > 0
    assert all(n.num_computed_tokens == 0 for n in sim.w.seen_new)
    assert all(r.num_output_tokens == 10 for r in reqs)
    assert_no_leaks(sim)


def test_lone_request_that_fills_the_pool_finishes():
    sim = Sim(make_scheduler(num_blocks=4, block_size=4, max_batched=8))
    r = sim.add(make_request("r", list(range(9)), max_tokens=8))  # 9 + 8 - 1 = 16 computed tokens
    sim.run()
    assert r.num_output_tokens == 8 and sim.s.num_preemptions == 0
    assert_no_leaks(sim)


# -- finishing, aborts, leaks -----------------------------------------------------------------------


def test_abort_while_waiting_and_while_running():
    sim = Sim(make_scheduler(num_blocks=32, max_num_seqs=2))
    a = sim.add(make_request("a", list(range(9)), max_tokens=50))
    b = sim.add(make_request("b", list(range(9)), max_tokens=50))
    c = sim.add(make_request("c", list(range(50, 55)), max_tokens=50))
    sim.step()
    sim.step()
    assert a.status == b.status == RequestStatus.RUNNING and c.status == RequestStatus.WAITING
    done = sim.s.finish_requests(["c", "a", "nope"], RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in done] == ["c", "a"]
    assert a.status == c.status == RequestStatus.FINISHED_ABORTED
    assert sim.s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED) == []  # idempotent
    out, _ = sim.step()
    assert sorted(out.finished_req_ids) == ["a", "c"]
    assert "a" not in sim.w.reqs and "b" in sim.w.reqs
    assert list(out.num_scheduled_tokens) == ["b"]
    sim.s.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    assert b.is_finished
    assert_no_leaks(sim)


def test_abort_of_a_preempted_request():
    sim = Sim(make_scheduler(num_blocks=6, block_size=4))
    reqs = [sim.add(make_request(f"r{i}", [i * 10 + j for j in range(6)], max_tokens=10)) for i in range(3)]
    while not any(r.status == RequestStatus.PREEMPTED for r in reqs):
        sim.step()
    victim = next(r for r in reqs if r.status == RequestStatus.PREEMPTED)
    assert sim.s.finish_requests([victim.request_id], RequestStatus.FINISHED_ABORTED) == [victim]
    check_invariants(sim.s)
    out, _ = sim.step()
    assert victim.request_id in out.finished_req_ids
    sim.run()
    assert_no_leaks(sim)


def test_abort_while_the_step_is_in_flight():
    sim = Sim(make_scheduler(num_blocks=32))
    a = sim.add(make_request("a", list(range(9)), max_tokens=5))
    b = sim.add(make_request("b", list(range(9)), max_tokens=5))
    sim.step()
    out, sampled = sim.step(lambda out: sim.s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED))
    assert "a" in out.num_scheduled_tokens and "a" in sampled  # the model did sample it...
    assert a.num_output_tokens == 1 and a.status == RequestStatus.FINISHED_ABORTED  # ...but it is dropped
    assert b.num_output_tokens == 2
    out, _ = sim.step()
    assert out.finished_req_ids == ["a"] and "a" not in sim.w.reqs
    sim.run()
    assert_no_leaks(sim)


def test_finished_ids_reach_the_workers_once():
    sim = Sim(make_scheduler(num_blocks=32))
    sim.add(make_request("a", [1, 2, 3], max_tokens=1))
    sim.add(make_request("b", [4, 5, 6], max_tokens=3))
    sim.step()
    assert sim.finished.keys() == {"a"}
    out, _ = sim.step()
    assert out.finished_req_ids == ["a"]
    out, _ = sim.step()
    assert out.finished_req_ids == []
    out = sim.drain()
    assert out.finished_req_ids == ["b"]
    assert sim.s.schedule().finished_req_ids == []


# -- stop rules --------------------------------------------------------------------------------------


def run_one(tokens: list[int], **kwargs) -> Request:
    it = iter(tokens)
    sim = Sim(make_scheduler(num_blocks=64), choose=lambda rid, toks: next(it))
    r = sim.add(make_request("r", [5, 6, 7], **kwargs))
    sim.run()
    assert_no_leaks(sim)
    return r


def test_eos_stops_without_stop_reason():
    r = run_one([11, 12, EOS, 13, 14], max_tokens=10)
    assert r.output_token_ids == [11, 12, EOS]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None


def test_stop_token_id_sets_stop_reason():
    r = run_one([11, 99, 12], max_tokens=10, stop_token_ids=[99])
    assert r.output_token_ids == [11, 99]
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason == 99


def test_ignore_eos_keeps_going():
    r = run_one([EOS] * 6, max_tokens=6, ignore_eos=True)
    assert r.output_token_ids == [EOS] * 6
    assert r.status == RequestStatus.FINISHED_LENGTH and r.stop_reason is None


def test_ignore_eos_still_honours_stop_token_ids():
    r = run_one([EOS, 42, 11], max_tokens=6, ignore_eos=True, stop_token_ids=[42])
    assert r.output_token_ids == [EOS, 42] and r.stop_reason == 42


def test_min_tokens_defers_eos():
    r = run_one([EOS] * 10, max_tokens=10, min_tokens=3)
    assert r.output_token_ids == [EOS] * 3
    assert r.status == RequestStatus.FINISHED_STOPPED


def test_min_tokens_defers_stop_token_ids():
    r = run_one([42, 11, 42, 42], max_tokens=10, min_tokens=2, stop_token_ids=[42])
    assert r.output_token_ids == [42, 11, 42] and r.stop_reason == 42


def test_max_tokens_gives_length():
    r = run_one([11] * 10, max_tokens=4)
    assert r.output_token_ids == [11] * 4
    assert r.status == RequestStatus.FINISHED_LENGTH and r.stop_reason is None


def test_eos_on_the_last_allowed_token_is_length():
    # The length rule is checked before the stop rules, as vLLM's check_stop does.
    r = run_one([11, 12, EOS], max_tokens=3)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.stop_reason is None


def test_eos_listed_in_stop_token_ids_has_no_stop_reason():
    r = run_one([11, EOS], max_tokens=5, stop_token_ids=[EOS])
    assert r.status == RequestStatus.FINISHED_STOPPED and r.stop_reason is None


def test_prefix_cache_stats_count_each_request_once():
    sim = Sim(make_scheduler(num_blocks=64, block_size=4, max_batched=64))
    prompt = list(range(9))
    sim.add(make_request("a", prompt, max_tokens=2))
    sim.run()
    sim.add(make_request("b", prompt, max_tokens=2))
    sim.run()
    pool = sim.s.kv.pool
    assert (pool.num_queries, pool.num_hits) == (18, 8)


# -- diff messages ----------------------------------------------------------------------------------


def test_cached_request_data_carries_only_the_new_tokens_and_blocks():
    sim = Sim(make_scheduler(num_blocks=64, block_size=4, max_batched=5))
    r = sim.add(make_request("r", list(range(7)), max_tokens=12))
    out, sampled = sim.step()  # chunk of 5: 2 blocks
    (nr,) = out.new_reqs
    assert nr.token_ids == list(range(7)) and nr.block_ids == sim.s.kv.block_ids("r")
    assert len(nr.block_ids) == 2 and sampled == {}
    out, sampled = sim.step()  # the last 2 prompt tokens: no new token, no block
    (cr,) = out.cached_reqs
    assert cr.new_token_ids == [] and cr.new_block_ids == [] and cr.num_computed_tokens == 5
    seen_blocks = list(sim.s.kv.block_ids("r"))
    for _ in range(10):
        last = r.output_token_ids[-1]
        before = list(sim.s.kv.block_ids("r"))
        out, _ = sim.step()
        (cr,) = out.cached_reqs
        assert not out.new_reqs
        assert cr.new_token_ids == [last]
        after = sim.s.kv.block_ids("r")
        assert cr.new_block_ids == after[len(before) :]
        assert not set(cr.new_block_ids) & set(seen_blocks)
        seen_blocks += cr.new_block_ids
        assert cr.num_computed_tokens == r.num_computed_tokens - 1
    assert seen_blocks == sim.s.kv.block_ids("r")
    assert len(seen_blocks) == 5  # 17 computed tokens


def test_unscheduled_running_request_gets_all_missed_tokens_later():
    # max_num_seqs lets both run, the budget of 1 schedules only one of them per step.
    sim = Sim(make_scheduler(num_blocks=64, max_batched=1))
    sim.add(make_request("a", [1], max_tokens=4))
    sim.add(make_request("b", [2], max_tokens=4))
    sim.run()  # the worker asserts every diff rebuilds the scheduler's tokens
    assert len(sim.finished) == 2 and all(r.num_output_tokens == 4 for r in sim.finished.values())
    assert_no_leaks(sim)


# -- randomized property test -----------------------------------------------------------------------


def _random_run(seed: int, ahead: bool = False, policy: str = "fcfs") -> dict[str, int]:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 8])
    num_blocks = rng.randint(4, 20)
    capacity = num_blocks * bs
    chunked = rng.random() < 0.8
    max_batched = rng.randint(max(2, capacity // 4), capacity + 8)
    cfg = dict(
        num_blocks=num_blocks,
        block_size=bs,
        max_num_seqs=rng.randint(1, 8),
        max_batched=max_batched,
        chunked=chunked,
        caching=rng.random() < 0.8,
        policy=policy,
    )
    vocab = rng.randint(3, 8)  # small: equal blocks after different prefixes happen
    eos = (0,) if rng.random() < 0.5 else ()
    limit = capacity if chunked else min(capacity, max_batched)
    bases = [[rng.randrange(vocab) for _ in range(rng.randint(1, 3 * bs + 2))] for _ in range(3)]
    sim = Sim(make_scheduler(**cfg), choose=lambda rid, toks: rng.randrange(vocab), ahead=ahead)

    pending = []
    for i in range(rng.randint(15, 40)):
        prompt = (list(rng.choice(bases)) if rng.random() < 0.7 else []) + [
            rng.randrange(vocab) for _ in range(rng.randint(0, 2 * bs + 3))
        ]
        prompt = (prompt or [1])[: max(1, limit - 1)]
        max_tokens = rng.randint(1, min(20, limit - len(prompt)))
        params = {}
        if rng.random() < 0.3:
            params["stop_token_ids"] = [rng.randrange(vocab)]
        if rng.random() < 0.2:
            params["min_tokens"] = rng.randint(0, max_tokens)
        if rng.random() < 0.1:
            params["ignore_eos"] = True
        if rng.random() < 0.1:
            params["prompt_logprobs"] = 1
        if rng.random() < 0.05:
            params["presence_penalty"] = 0.5
        priority = rng.randint(-2, 2) if policy == "priority" else 0
        req = make_request(f"s{seed}-{i}", prompt, max_tokens, eos, priority, **params)
        pending.append((rng.randint(0, 60), req))
    pending.sort(key=lambda p: p[0])
    everyone = [r for _, r in pending]
    aborted: set[str] = set()

    steps = 0
    while pending or sim.busy:
        while pending and pending[0][0] <= steps:
            sim.add(pending.pop(0)[1])
        if sim.s.requests and rng.random() < 0.06:
            rid = rng.choice(sorted(sim.s.requests))
            done = sim.s.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            assert [r.request_id for r in done] == [rid]
            aborted.add(rid)
            check_invariants(sim.s)
        between = None
        if rng.random() < 0.04:

            def between(out: SchedulerOutput) -> None:  # abort a request whose step is in flight
                if out.num_scheduled_tokens:
                    rid = rng.choice(sorted(out.num_scheduled_tokens))
                    assert sim.s.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                    aborted.add(rid)

        sim.step(between)
        steps += 1
        assert steps < 3000, "no progress"

    for r in everyone:
        assert r.is_finished
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
            continue
        out, params = r.output_token_ids, r.sampling_params
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos))
        # No stop token after min_tokens before the last one, and the finish reason matches the rules.
        assert not any(t in stops for t in out[max(params.min_tokens, 1) - 1 : -1])
        if len(out) == r.max_tokens:  # length is checked first, as in vLLM
            assert r.status == RequestStatus.FINISHED_LENGTH
        elif out[-1] in stops and len(out) >= params.min_tokens:
            assert r.status == RequestStatus.FINISHED_STOPPED
        else:
            assert r.status == RequestStatus.FINISHED_LENGTH and len(out) == r.max_tokens
        assert len(out) <= r.max_tokens
        assert r.all_token_ids == r.prompt_token_ids + out
    assert_no_leaks(sim)
    return {
        "preemptions": sim.s.num_preemptions,
        "hits": sim.s.kv.pool.num_hits,
        "aborted": len(aborted),
        "checks": sim.w.num_context_checks,
        **sim.events,
    }


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("ahead", [False, True], ids=["sync", "async-scheduling"])
def test_randomized_invariants(ahead, policy):
    totals: Counter[str] = Counter()
    for seed in range(20):
        totals.update(_random_run(seed, ahead, policy))
    # The runs exercise what they are meant to.
    assert totals["preemptions"] > 0 and totals["hits"] > 0 and totals["aborted"] > 0
    if ahead:  # tokens that arrive after their request ended, or after it was preempted
        assert totals["dropped"] > 0 and totals["kept by a preempted request"] > 0, totals


# -- async scheduling ---------------------------------------------------------------------------------


def test_async_scheduling_schedules_the_next_step_before_the_last_tokens_arrive():
    sim = Sim(make_scheduler(num_blocks=64), choose=lambda rid, toks: 40 + len(toks), ahead=True)
    r = sim.add(make_request("r", [5, 6, 7], max_tokens=4))
    out, sampled = sim.step()  # the prefill: launched, not collected
    assert sampled == {"r": 43} and r.output_token_ids == [] and r.num_pending == 1
    out, sampled = sim.step()  # the first decode reads the pending token; then the prefill's comes in
    (cr,) = out.cached_reqs
    assert cr.new_token_ids == [] and cr.num_computed_tokens == 3 and out.num_scheduled_tokens == {"r": 1}
    assert sampled == {"r": 44} and r.output_token_ids == [43]
    out, _ = sim.step()
    assert out.cached_reqs[0].new_token_ids == [43]  # one step late, as the worker sampled it
    sim.run()
    assert r.output_token_ids == [43, 44, 45, 46] and r.status == RequestStatus.FINISHED_LENGTH
    # No step past max_tokens: the prefill and three decodes.
    assert sum("r" in o.num_scheduled_tokens for o in sim.outputs) == 4
    assert_no_leaks(sim)


def test_async_scheduling_drops_the_token_after_a_stop():
    tokens = iter([11, EOS, 12, 13])
    sim = Sim(make_scheduler(num_blocks=64), choose=lambda rid, toks: next(tokens), ahead=True)
    r = sim.add(make_request("r", [5, 6, 7], max_tokens=10))
    sim.run()
    assert r.output_token_ids == [11, EOS] and r.status == RequestStatus.FINISHED_STOPPED
    # The step after the EOS was already running when it arrived: its token was dropped.
    assert sim.events["dropped"] == 1 and sum("r" in o.num_scheduled_tokens for o in sim.outputs) == 3
    assert_no_leaks(sim)


def test_async_scheduling_runs_penalized_requests_one_step_at_a_time():
    sim = Sim(make_scheduler(num_blocks=64), ahead=True)
    plain = sim.add(make_request("plain", [1, 2, 3], max_tokens=6))
    sim.step()
    sim.step()
    assert len(sim.in_flight) == 1
    sim.add(make_request("pen", [4, 5, 6], max_tokens=6, presence_penalty=0.5))
    out, _ = sim.step()  # nothing launched while a step is in flight: that one is collected
    assert out is None and not sim.in_flight
    out, sampled = sim.step()  # from now on each step is launched and collected at once
    assert set(sampled) == {"plain", "pen"} and not sim.in_flight  # pen: its whole prompt
    sim.run()  # the fake worker checks every penalized step saw all its earlier tokens
    assert plain.num_output_tokens == 6 and len(sim.finished) == 2
    assert sim.s.num_needing_host_tokens == 0
    assert_no_leaks(sim)


# -- scheduling policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_admission_order_follows_the_policy(policy):
    """One sequence at a time: each request runs to its end, so the order they run in is the order
    they were admitted. Priority: lower first, equal priorities in arrival order."""
    sim = Sim(make_scheduler(num_blocks=64, max_num_seqs=1, policy=policy))
    for i, prio in enumerate([3, -1, 0, -1, 7]):
        sim.add(make_request(f"r{i}", [i + 1, i + 2], max_tokens=2, priority=prio, arrival=float(i)))
    order = []
    while sim.s.has_unfinished():
        out, _ = sim.step()
        order += [n.req_id for n in out.new_reqs]
    expect = ["r1", "r3", "r2", "r0", "r4"] if policy == "priority" else ["r0", "r1", "r2", "r3", "r4"]
    assert order == expect
    assert_no_leaks(sim)


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_the_request_preempted_is_the_newest_or_the_least_urgent(policy):
    """7 blocks of 4 tokens; a (priority 1) is admitted before b (priority 0), and the cache runs out
    (see test_preempted_request_resumes_from_its_cached_blocks). FCFS preempts b, the newest;
    priority preempts a, the less urgent, though it came first."""
    sim = Sim(make_scheduler(num_blocks=7, block_size=4, max_batched=64, policy=policy))
    a = sim.add(make_request("a", list(range(100, 113)), max_tokens=8, priority=1, arrival=0.0))
    b = sim.add(make_request("b", list(range(200, 209)), max_tokens=6, priority=0, arrival=1.0))
    while not (a.num_preemptions or b.num_preemptions):
        assert sim.s.has_unfinished()
        sim.step()
    victim, other = (a, b) if policy == "priority" else (b, a)
    assert victim.num_preemptions == 1 and other.num_preemptions == 0
    assert sim.s.waiting.peek() is victim and sim.s.running == [other]
    sim.run()
    assert a.is_finished and b.is_finished
    assert_no_leaks(sim)


def test_a_preempted_request_waits_behind_more_urgent_ones():
    """Priority: a preempted request goes back to its place in the order, not to the head."""
    sim = Sim(make_scheduler(num_blocks=7, block_size=4, max_batched=64, policy="priority"))
    a = sim.add(make_request("a", list(range(100, 113)), max_tokens=8, priority=1, arrival=0.0))
    sim.add(make_request("b", list(range(200, 209)), max_tokens=6, priority=0, arrival=1.0))
    while not a.num_preemptions:
        sim.step()
    sim.add(make_request("c", [7, 8], max_tokens=1, priority=0, arrival=2.0))
    sim.add(make_request("d", [9, 10], max_tokens=1, priority=2, arrival=3.0))
    assert [r.request_id for r in sim.s.waiting] == ["c", "a", "d"]
    sim.run()
    assert_no_leaks(sim)
