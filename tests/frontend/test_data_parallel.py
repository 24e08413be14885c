"""Data parallelism: replicas behind one front end give the outputs one engine gives, share the
requests, route aborts to the replica holding the request, and outlive each other's death."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from distgen import LLM, SamplingParams
from distgen.config import ParallelConfig
from distgen.engine_core.messages import EngineCoreRequest, SchedulerStatsMsg
from distgen.exceptions import EngineDeadError, ReplicaDeadError
from distgen.frontend.args import EngineArgs
from distgen.frontend.async_llm import AsyncLLM
from distgen.frontend.core_client import EngineCoreClient
from distgen.frontend.dp_router import Router, sum_stats
from tests.conftest import check_greedy_close, process_alive, random_prompts, wait_gone

KV = 16 << 20
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(8, seed=21)]


def _req(rid: str, tokens: list[int]) -> EngineCoreRequest:
    return EngineCoreRequest(rid, tokens, GREEDY, 0.0)


def test_router_takes_the_least_loaded_live_replica_and_prefers_a_prefix_home_on_a_tie():
    r = Router(3, block_size=4)
    assert [r.route(_req(str(i), [i] * 8)) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    r.release("1")  # replica 1 has one request fewer now
    assert r.route(_req("x", [9] * 8)) == 1
    # A tie: the replica that took the same first block before takes it again.
    r.release("x")
    r.release("2")
    assert r.load == [2, 1, 1]
    assert r.route(_req("y", [2] * 4 + [7, 7])) == 2  # "2" went to replica 2 with the same first block
    assert r.fail(0) == ["0", "3"] and r.load == [0, 1, 2]
    assert r.route(_req("z", [1] * 8)) == 1  # dead replicas take nothing, however idle
    assert r.release("0") is None  # a lost request is no replica's any more
    r.fail(1)
    r.fail(2)
    with pytest.raises(EngineDeadError):
        r.route(_req("w", [1]))


def test_stats_are_summed_and_kv_usage_is_weighted_by_blocks():
    a = SchedulerStatsMsg(2, 1, 0.5, 10, 4, 1, num_worker_restarts=1)
    b = SchedulerStatsMsg(1, 0, 0.1, 6, 2, 0, recovering=True)
    s = sum_stats([a, b], [100, 300])
    assert (s.num_running, s.num_waiting, s.prefix_cache_queries, s.prefix_cache_hits) == (3, 1, 16, 6)
    assert s.num_preemptions == 1 and s.num_worker_restarts == 1
    assert s.kv_cache_usage == pytest.approx((50 + 30) / 400)
    assert not s.recovering  # replica a still serves: /health stays 200
    assert sum_stats([a, b], [0, 300]).recovering  # a is dead, the only live one recovers


def test_data_parallel_size_is_checked_and_the_in_process_client_refuses_it(tiny_model_dir, monkeypatch):
    with pytest.raises(ValueError, match="data_parallel_size must be >= 1, got 0"):
        ParallelConfig(data_parallel_size=0)
    config = EngineArgs(model=tiny_model_dir("llama"), data_parallel_size=2).create_config()
    assert config.parallel.data_parallel_size == 2
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")
    with pytest.raises(ValueError, match="DISTGEN_ENABLE_MULTIPROCESSING=0"):
        EngineCoreClient.make(config)


def test_cpu_workers_of_every_replica_split_the_hosts_cores(tiny_model_dir, monkeypatch):
    """Replica r's rank k takes share r*tp + k of dp*tp: the replicas' threads never share a core."""
    from distgen.executor import worker_loop
    from distgen.frontend.dp_client import replica_config
    from distgen.workers.cpu_threads import plan

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(worker_loop, "configure", lambda spec, rank, size: calls.append((rank, size)))
    config = EngineArgs(
        model=tiny_model_dir("llama"), data_parallel_size=2, tensor_parallel_size=2, device="cpu"
    ).create_config()
    for dp_rank in (0, 1):
        for rank in (0, 1):
            worker_loop.setup_cpu_threads(replica_config(config, dp_rank), rank, 2)
    assert calls == [(0, 4), (1, 4), (2, 4), (3, 4)]
    monkeypatch.setattr("distgen.workers.cpu_threads.physical_cores", lambda cpus: sorted(cpus))
    assert [plan("auto", r, 4, list(range(8))) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_each_replica_sees_its_own_gpus(tiny_model_dir, monkeypatch):
    """On CUDA without Ray, replica r sees GPUs r*w .. r*w + w - 1, w = tp x pp of one replica."""
    from dataclasses import replace

    from distgen.frontend.dp_client import replica_config, replica_env

    args = dict(data_parallel_size=2, tensor_parallel_size=2, pipeline_parallel_size=2, device="cpu")
    config = EngineArgs(model=tiny_model_dir("llama"), **args).create_config()
    config = replace(config, device="cuda")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    seen = [replica_env(replica_config(config, r), r, None)["CUDA_VISIBLE_DEVICES"] for r in (0, 1)]
    assert seen == ["0,1,2,3", "4,5,6,7"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    with pytest.raises(ValueError, match="needs 8 GPUs; CUDA_VISIBLE_DEVICES='0,1,2' shows 3"):
        replica_env(replica_config(config, 0), 0, None)


SCRIPT = """
import os, sys
from distgen import LLM, SamplingParams
llm = LLM(sys.argv[1], data_parallel_size=2, kv_cache_memory=16 << 20)
llm.generate("Hello", SamplingParams(max_tokens=2), use_tqdm=False)
client = llm.llm_engine.client
print("PIDS", *client.pids, *client.ready.worker_pids, flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.slow
def test_a_killed_front_end_leaves_no_replica_behind(tiny_model_dir, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), tiny_model_dir("llama")], capture_output=True, text=True
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PIDS")), None)
    assert line is not None and proc.returncode == -9, proc.stderr[-3000:]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) >= 2 and wait_gone(pids) == [], "a replica outlived its front end"


@pytest.mark.slow
def test_a_replica_that_cannot_start_fails_the_start_and_stops_the_others(tiny_model_dir):
    from tests.frontend.test_core_client import _children

    before = _children()
    with pytest.raises(ValueError, match="does not fit one block"):
        LLM(tiny_model_dir("llama"), kv_cache_memory=1, data_parallel_size=2)
    assert wait_gone(list(_children() - before)) == []


def _spy_routing(client) -> list[int]:
    seen: list[int] = []
    route = client.router.route
    client.router.route = lambda req: seen.append(route(req)) or seen[-1]
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_replicas_give_one_engines_greedy_outputs_and_share_the_batch(tp, tiny_model_dir, hf_reference):
    model = tiny_model_dir("llama")
    llm = LLM(model, kv_cache_memory=KV, data_parallel_size=2, tensor_parallel_size=tp)
    client = llm.llm_engine.client
    seen = _spy_routing(client)
    pids = list(client.pids) + [p for p in client.ready.worker_pids if p]
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        stats = llm.llm_engine.get_stats()
    finally:
        llm.shutdown()
    assert wait_gone(pids) == []
    assert sorted(seen) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(s is not None and s.prefix_cache_queries > 0 for s in client._stats)  # both computed
    assert stats.prefix_cache_queries == sum(len(p["prompt_token_ids"]) for p in PROMPTS)
    tokens = [o.outputs[0].token_ids for o in outs]
    if tp == 1:  # the same tokens as one engine given the whole batch
        one = LLM(model, kv_cache_memory=KV)
        try:
            assert tokens == [o.outputs[0].token_ids for o in one.generate(PROMPTS, GREEDY, use_tqdm=False)]
        finally:
            one.shutdown()
    refs = hf_reference("llama", [p["prompt_token_ids"] for p in PROMPTS], GREEDY.max_tokens)
    check_greedy_close(refs, tokens, f"dp2 tp{tp}")


@pytest.mark.slow
def test_an_abort_goes_to_the_replica_that_holds_the_request_then_one_dies_under_llm(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), kv_cache_memory=KV, data_parallel_size=2)
    engine = llm.llm_engine
    client = engine.client
    sent: list[tuple[int, list[str]]] = []
    for rank, rep in enumerate(client.replicas):
        orig = rep.abort_requests
        rep.abort_requests = lambda ids, rank=rank, orig=orig: (sent.append((rank, list(ids))), orig(ids))
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    try:
        for rid in ("a", "b"):
            engine.add_request({"prompt_token_ids": [5, 6, 7]}, long, request_id=rid)
        owner_b = client.router.owner["b"]
        assert {client.router.owner["a"], owner_b} == {0, 1}
        engine.step()
        engine.abort_request(["b"])
        assert sent == [(owner_b, ["b"])] and client.router.load[owner_b] == 0
        done = [o for o in engine.run_to_completion(["a"])]
        assert len(done[0].outputs[0].token_ids) == 400
        stats = engine.get_stats()
        assert stats.num_running == 0 and stats.num_waiting == 0  # b ended in its replica too

        # LLM.generate: a replica dying mid-batch raises from the call; the next call runs on the other.
        victim = client.pids[0]
        engine.add_request({"prompt_token_ids": [5, 6, 7]}, long, request_id="c")
        engine.step()
        os.kill(victim, signal.SIGKILL)
        with pytest.raises(ReplicaDeadError, match="data-parallel replica 0 is dead"):
            llm.generate(PROMPTS[:2], long, use_tqdm=False)
        assert not engine.has_unfinished_requests() and client.router.owner == {}
        outs = llm.generate(PROMPTS[:4], GREEDY, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [GREEDY.max_tokens] * 4
    finally:
        llm.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["core", "worker"])
def test_a_dead_replica_ends_only_its_requests_and_the_others_serve_on(kill, tiny_model_dir):
    """The replica's engine-core process killed, or its only worker with recovery off (the core then
    reports its engine dead and exits)."""
    workers = dict(distributed_executor_backend="mp", max_worker_restarts=0) if kill == "worker" else {}
    engine = AsyncLLM.from_engine_args(
        EngineArgs(model=tiny_model_dir("llama"), kv_cache_memory=KV, data_parallel_size=2, **workers)
    )
    client = engine.client
    long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
    short = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    got: dict[str, int] = {}

    async def consume(rid: str, params: SamplingParams) -> int:
        async for out in engine.generate({"prompt_token_ids": [5, 6, 7, 8]}, params, rid):
            got[rid] = got.get(rid, 0) + len(out.outputs[0].token_ids)
        return got[rid]

    async def main() -> None:
        tasks = {rid: asyncio.create_task(consume(rid, long)) for rid in "abcd"}
        while len(got) < 4:
            await asyncio.sleep(0.005)
        owner = dict(client.router.owner)
        victim = owner["a"]
        rep = client.replicas[victim].ready
        os.kill(rep.pid if kill == "core" else rep.worker_pids[0], signal.SIGKILL)
        for rid, task in tasks.items():
            if owner[rid] == victim:
                with pytest.raises(ReplicaDeadError, match=f"data-parallel replica {victim} is dead"):
                    await task
            else:
                assert await task == long.max_tokens
        assert not engine.errored and client.num_live_replicas == 1
        assert await consume("e", short) == 5 and client.router.owner == {}
        assert isinstance(ReplicaDeadError("x", []), EngineDeadError)  # the server's 503 path

    t0 = time.monotonic()
    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
    assert time.monotonic() - t0 < 30
    pids = client.pids + client.ready.worker_pids
    assert wait_gone(pids) == [] and not any(process_alive(p) for p in pids)
