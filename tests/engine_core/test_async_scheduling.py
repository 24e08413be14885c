"""Async scheduling: the engine core launches step n+1 before it collects step n.

In the engine core itself (in this process): outputs come one call behind the launches, an abort or
a stop while a step is in flight loses nothing for anyone else, penalized requests go one step at a
time. Through ``LLM``, with one worker and with two tensor-parallel ranks: every sampling feature
gives the same tokens as without async scheduling.
"""

from __future__ import annotations

import math
import time

import pytest

from distgen import LLM, SamplingParams
from distgen.engine_core.core import EngineCore
from distgen.engine_core.messages import EngineCoreRequest
from distgen.frontend.args import EngineArgs
from distgen.sampling_spec import SamplingSpec
from tests.conftest import random_prompts

KV = 16 << 20
PROMPTS = random_prompts(6, seed=11, lo=4, hi=24)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _core(model_dir: str, **kwargs) -> EngineCore:
    config = EngineArgs(
        model=model_dir, dtype="float32", kv_cache_memory=KV, async_scheduling=True, **kwargs
    ).create_config()
    return EngineCore(config)


def _add(core: EngineCore, rid: str, prompt: list[int], **params) -> None:
    params.setdefault("temperature", 0.0)
    params.setdefault("ignore_eos", True)
    core.add_request(EngineCoreRequest(rid, prompt, SamplingSpec(**params), time.time()))


def _run(core: EngineCore, max_calls: int = 500) -> dict[str, list[int]]:
    """Step until nothing is left; every request's tokens, checking nothing comes after its end."""
    tokens: dict[str, list[int]] = {}
    ended: set[str] = set()
    for _ in range(max_calls):
        if not core.has_work():
            return tokens
        for out in core.step().outputs:
            assert out.request_id not in ended, f"{out.request_id}: output after its end"
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.finish_reason is not None:
                ended.add(out.request_id)
    raise AssertionError("the engine core did not finish")


def test_outputs_come_one_call_behind_the_launches(model_dir):
    core = _core(model_dir)
    try:
        _add(core, "a", PROMPTS[0], max_tokens=3)
        first = core.step()
        assert first.outputs == [] and len(core._in_flight) == 1  # the prefill runs; nothing to collect
        second = core.step()  # launches the first decode, then collects the prefill
        assert [o.new_token_ids for o in second.outputs] == [second.outputs[0].new_token_ids]
        assert len(second.outputs[0].new_token_ids) == 1 and len(core._in_flight) == 1
        rest = _run(core)
        assert len(second.outputs[0].new_token_ids + rest["a"]) == 3
        assert not core._in_flight and not core.has_work()
        # No step was launched past max_tokens: the request's blocks are all back.
        assert core.scheduler.kv.usage == 0.0
    finally:
        core.shutdown()


def test_abort_and_stop_while_a_step_is_in_flight(model_dir):
    core = _core(model_dir, max_num_seqs=4)
    try:
        _add(core, "keep", PROMPTS[1], max_tokens=12)
        _add(core, "abort", PROMPTS[2], max_tokens=12)
        core.step()
        core.step()
        assert len(core._in_flight) == 1
        core.abort_requests(["abort"])  # its token from the step in flight must not come out
        # A greedy run tells what "stop" samples; its first new token after the first one stops it.
        probe = _core(model_dir)
        try:
            _add(probe, "p", PROMPTS[3], max_tokens=8)
            greedy = _run(probe)["p"]
        finally:
            probe.shutdown()
        k = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
        _add(core, "stop", PROMPTS[3], max_tokens=12, stop_token_ids=[greedy[k]])
        got = _run(core)
        assert got["stop"] == greedy[: k + 1]
        assert "abort" not in got or got["abort"] == []
        assert len(got["keep"]) + 1 == 12  # one came out before the abort, in the second call
        assert core.scheduler.kv.usage == 0.0 and not core.scheduler.requests
    finally:
        core.shutdown()


def test_penalized_requests_run_one_step_at_a_time(model_dir):
    core = _core(model_dir)
    try:
        _add(core, "plain", PROMPTS[1], max_tokens=6)
        core.step()
        assert len(core._in_flight) == 1  # running ahead
        _add(core, "pen", PROMPTS[0], max_tokens=6, presence_penalty=1.5)
        core.step()  # the step in flight is collected; nothing is launched beside it
        assert not core._in_flight
        calls = 0
        while core.has_work():
            out = core.step()
            calls += 1
            assert not core._in_flight  # each step is launched and collected in the same call
            assert out.outputs, "a call that returns nothing is a wasted round trip"
        assert calls == 6 and core.scheduler.num_needing_host_tokens == 0
    finally:
        core.shutdown()


SAMPLING = [
    SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, logprobs=2),
    SamplingParams(temperature=1.0, top_k=20, seed=8, n=2, max_tokens=10),
    SamplingParams(temperature=0, max_tokens=14, min_tokens=6, stop_token_ids=[5, 9, 17]),
    SamplingParams(temperature=0.7, seed=9, max_tokens=10, presence_penalty=0.8, repetition_penalty=1.2),
    SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=1, logprobs=1),
    SamplingParams(temperature=0.9, seed=11, max_tokens=8, allowed_token_ids=[5, 9, 17], logit_bias={9: 1.5}),
    SamplingParams(temperature=0, max_tokens=12, bad_words=["the", "of the", "and a"]),
    SamplingParams(
        temperature=0.8, seed=13, max_tokens=16, structured_outputs={"regex": r"[a-z]{2,6}( [0-9]+)?"}
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2], ids=["one-worker", "tp2-mp"])
def test_every_sampling_feature_gives_the_same_tokens_as_synchronous_steps(model_dir, tp):
    runs = []
    for async_scheduling in (False, True):
        llm = LLM(
            model_dir,
            dtype="float32",
            kv_cache_memory=KV,
            tensor_parallel_size=tp,
            async_scheduling=async_scheduling,
        )
        try:
            prompts = [{"prompt_token_ids": PROMPTS[i % len(PROMPTS)]} for i in range(len(SAMPLING))]
            runs.append(llm.generate(prompts, SAMPLING, use_tqdm=False))
        finally:
            llm.shutdown()
    sync, ahead = runs
    for i, (a, b) in enumerate(zip(sync, ahead)):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs], f"request {i}"
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in b.outputs]
        for ca, cb in zip(a.outputs, b.outputs):
            for la, lb in zip(ca.logprobs or [], cb.logprobs or []):
                assert la.keys() == lb.keys()
                assert all(math.isclose(la[t].logprob, lb[t].logprob, abs_tol=1e-4) for t in la)
        if a.prompt_logprobs is not None:
            pa = [None if d is None else {t: v.logprob for t, v in d.items()} for d in a.prompt_logprobs]
            pb = [None if d is None else {t: v.logprob for t, v in d.items()} for d in b.prompt_logprobs]
            assert [None if d is None else d.keys() for d in pa] == [
                None if d is None else d.keys() for d in pb
            ]
    # The min_tokens request held off its stop tokens, then may have stopped on one.
    assert len(sync[2].outputs[0].token_ids) >= 6
    assert set(sync[5].outputs[0].token_ids) <= {5, 9, 17}
