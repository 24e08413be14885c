"""The ``ray`` executor, on a Ray cluster of two simulated nodes (``ray.cluster_utils.Cluster``, one CPU
each) shared by the module: with one ``{"CPU": 1}`` bundle per rank, TP=2 puts one rank on each node and
gloo runs between them over this host's address. The engine core runs in its own process (the default),
so the executor joins the cluster through ``RAY_ADDRESS`` there; the actors are found by their process
title (``ray::DistgenWorker``)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from safetensors.torch import load_file, save_file

from distgen import LLM, SamplingParams
from distgen.exceptions import EngineDeadError, WorkerStartupError
from distgen.executor.base import Executor
from distgen.frontend.args import EngineArgs
from distgen.sampling_spec import SamplingSpec
from distgen.workers.scheduler_output import NewRequestData, SchedulerOutput
from tests.conftest import check_greedy_close, process_alive, random_prompts

ray = pytest.importorskip("ray")

MAX_NEW = 10
PROMPTS = random_prompts(12, seed=5)
KV = 16 << 20
PREEMPTION = dict(num_gpu_blocks_override=40, block_size=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
ACTOR_TITLE = b"ray::DistgenWorker"


def _actor_pids() -> list[int]:
    """Live processes of distgen's worker actors (their title is ray::DistgenWorker[.method])."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if f.read().startswith(ACTOR_TITLE) and process_alive(int(d)):
                        found.append(int(d))
            except OSError:
                pass
    return found


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def _wait_no_actors(timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while _actor_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _actor_pids() == [], "distgen worker actors are still alive"


@pytest.fixture(scope="module")
def cluster():
    """Two Ray nodes with one CPU each; this process is connected, and RAY_ADDRESS points the engine
    core's process at the same cluster."""
    from ray.cluster_utils import Cluster

    node = dict(num_cpus=1, object_store_memory=80 << 20)
    c = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
    c.add_node(**node)
    c.wait_for_nodes()
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = c.address
    ray.init(address=c.address, logging_level="WARNING")
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = old


def _ray_llm(path: str, tp: int = 2, **kwargs) -> LLM:
    backend = dict(tensor_parallel_size=tp, distributed_executor_backend="ray")
    return LLM(path, kv_cache_memory=KV, **backend, **kwargs)


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,scenario", [("llama", "preemption"), ("qwen2", "prefix-cache"), ("llama", "async-preemption")]
)
def test_tp2_greedy_matches_tp1_and_transformers(arch, scenario, cluster, tiny_model_dir, hf_reference):
    kwargs = dict(
        dtype="float32", kv_cache_memory=KV, **(PREEMPTION if scenario.endswith("preemption") else {})
    )
    prompts, refs = PROMPTS, hf_reference(arch, PROMPTS, MAX_NEW)
    if scenario == "prefix-cache":  # every prompt twice in one batch: the later copies hit the cache
        prompts, refs, kwargs["block_size"] = PROMPTS * 2, refs * 2, 4
    llm1 = LLM(tiny_model_dir(arch), **kwargs)
    base = _generate(llm1, prompts)
    llm1.shutdown()
    ray_kwargs = dict(tensor_parallel_size=2, distributed_executor_backend="ray")
    llm = LLM(tiny_model_dir(arch), async_scheduling=scenario.startswith("async"), **ray_kwargs, **kwargs)
    assert len(_actor_pids()) == 2
    got = _generate(llm, prompts)
    stats = llm.llm_engine.get_stats()
    if scenario.endswith("preemption"):
        assert stats.num_preemptions > 0
    else:
        assert stats.prefix_cache_hits > 0
    assert (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0.0)
    same = sum(a == b for a, b in zip(got, base)) / len(base)
    print(f"[ray {arch} tp=2 {scenario}] identical to tp=1: {same:.0%}")
    check_greedy_close(refs, got, f"ray/{arch}/{scenario}")  # DESIGN.md's rule; prints the exact-match rate
    llm.shutdown()
    _wait_no_actors()
    assert ray.available_resources().get("CPU") == 2  # the placement group is gone too


@pytest.mark.slow
def test_pp2_one_stage_per_node_matches_pp1(cluster, tiny_model_dir, hf_reference):
    """Two pipeline stages on the two nodes (one CPU each): hidden states cross between the nodes'
    workers, micro-batches in flight, with preemption; the tokens are pp=1's."""
    path = tiny_model_dir("qwen3-4l")
    kwargs = dict(dtype="float32", **PREEMPTION)
    llm1 = LLM(path, kv_cache_memory=KV, **kwargs)
    base = _generate(llm1, PROMPTS)
    llm1.shutdown()
    llm = _ray_llm(path, tp=1, pipeline_parallel_size=2, **kwargs)
    assert len(_actor_pids()) == 2
    got = _generate(llm, PROMPTS)
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert got == base
    check_greedy_close(hf_reference("qwen3-4l", PROMPTS, MAX_NEW), got, "ray/qwen3-4l/pp2")
    llm.shutdown()
    _wait_no_actors()


@pytest.mark.slow
def test_two_data_parallel_replicas_each_with_its_placement_group(cluster, tiny_model_dir, hf_reference):
    """dp=2 on the two one-CPU nodes: each replica's engine core places its own group (one bundle),
    so one actor lands on each node; the outputs are transformers'."""
    kwargs = dict(dtype="float32", kv_cache_memory=KV, distributed_executor_backend="ray")
    llm = LLM(tiny_model_dir("llama"), data_parallel_size=2, **kwargs)
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert len(_actor_pids()) == 2 and len(groups) == 2
    got = _generate(llm, PROMPTS)
    llm.shutdown()
    _wait_no_actors()
    check_greedy_close(hf_reference("llama", PROMPTS, MAX_NEW), got, "ray dp=2")
    assert ray.available_resources().get("CPU") == 2  # both placement groups are gone


@pytest.mark.slow
def test_default_model_at_tp2_on_ray_matches_tp1(cluster):
    """9 query heads on 2 actors: 5 and 4, the middle KV head on both, rank 1 starting inside its group."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    texts = ["The capital of France is", "def fibonacci(n):", "Why is the sky blue?"]
    got = {}
    for tp in (1, 2):
        backend = dict(distributed_executor_backend="ray") if tp > 1 else {}
        llm = LLM(tensor_parallel_size=tp, dtype="float32", kv_cache_memory=32 << 20, **backend)
        got[tp] = [o.outputs[0].token_ids for o in llm.generate(texts, params, use_tqdm=False)]
        llm.shutdown()
    assert got[2] == got[1]
    _wait_no_actors()


def _step(req_id: str, prompt: list[int]) -> SchedulerOutput:
    new = NewRequestData(req_id, prompt, len(prompt), SamplingSpec(temperature=0.0), [0], 0)
    return SchedulerOutput([new], [], {req_id: len(prompt)}, len(prompt))


@pytest.mark.slow
def test_executor_one_rank_per_node_then_a_killed_actor(cluster, tiny_model_dir):
    """In this process: a step on two nodes samples what one worker samples; then SIGKILL of one actor
    turns the next step into EngineDeadError within a second, and nothing is left."""
    args = dict(model=tiny_model_dir("llama"), dtype="float32", kv_cache_memory=KV, block_size=16)
    config = EngineArgs(**args).create_config()
    uni = Executor.create(config)
    uni.init_kv_cache(uni.determine_num_blocks())
    want = uni.execute_model(_step("a", PROMPTS[0][:10]))
    uni.shutdown()

    config = EngineArgs(**args, tensor_parallel_size=2).create_config()
    assert Executor.resolve_backend(None, 2) == "ray"  # this process is connected to Ray
    # Resolved in the user's process, before the engine-core process (which has no Ray of its own) starts.
    assert config.parallel.distributed_executor_backend == "ray"
    ex = Executor.create(config)
    assert type(ex).__name__ == "RayExecutor"
    nodes = ex.worker_node_ids
    assert len(set(nodes)) == 2, f"both ranks on one node: {nodes}"
    # The head node's rank is on this process's node: ipc; the other node's: tcp.
    assert sorted(ex.worker_transports) == ["ipc", "tcp"]
    assert sorted(ex.worker_pids) == sorted(_actor_pids())
    ex.init_kv_cache(ex.determine_num_blocks())
    assert ex.execute_model(_step("a", PROMPTS[0][:10])) == want

    os.kill(ex.worker_pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"worker rank 1 \(pid \d+ on [\d.]+\) died"):
        ex.execute_model(_step("b", PROMPTS[1][:10]))
    assert time.monotonic() - t0 < 5
    _wait_no_actors(timeout=5)
    with pytest.raises(EngineDeadError):
        ex.execute_model(_step("c", PROMPTS[2][:10]))
    ex.shutdown()
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ray.available_resources().get("CPU") == 2


@pytest.mark.slow
def test_worker_raising_in_forward_makes_engine_dead(cluster, tiny_model_dir):
    """A step the ranks cannot run (a block id past the cache) raises in every rank's forward: the
    traceback reaches the executor and the actors are removed."""
    config = EngineArgs(
        model=tiny_model_dir("llama"),
        tensor_parallel_size=2,
        distributed_executor_backend="ray",
        kv_cache_memory=KV,
    ).create_config()
    ex = Executor.create(config)
    ex.init_kv_cache(ex.determine_num_blocks())
    bad = NewRequestData("x", [5, 6, 7], 3, SamplingSpec(temperature=0.0), [10**6], 0)
    with pytest.raises(EngineDeadError, match=r"worker rank \d raised IndexError"):
        ex.execute_model(SchedulerOutput([bad], [], {"x": 3}, 3))
    _wait_no_actors(timeout=5)
    with pytest.raises(EngineDeadError):
        ex.execute_model(_step("a", [5, 6, 7]))
    ex.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [0, 3], ids=["recovery-off", "recovery-on"])
def test_actor_killed_mid_generation(restarts, cluster, tiny_model_dir):
    """Recovery off: every request ends with EngineDeadError. On (the default): new actors replace
    the lost ones (placed on the cluster again) and every request completes with its greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)  # far longer than 1 s
    prompts = [p[:20] for p in PROMPTS]
    llm = _ray_llm(tiny_model_dir("llama"), max_worker_restarts=restarts)
    want = _generate(llm, prompts, params) if restarts else None
    pids = _actor_pids()
    assert len(pids) == 2 and len({_ppid(p) for p in pids}) == 2  # one per node: two raylets
    started = threading.Event()
    killer = threading.Timer(1.0, lambda: (os.kill(pids[1], signal.SIGKILL), started.set()))
    killer.start()
    t0 = time.monotonic()
    try:
        if restarts:
            assert _generate(llm, prompts, params) == want
        else:
            with pytest.raises(EngineDeadError, match=r"worker rank \d \(pid \d+ on [\d.]+\) died"):
                _generate(llm, prompts, params)
    finally:
        killer.cancel()
    assert started.is_set(), "generation ended before the actor was killed"
    print(f"[ray {'recovery' if restarts else 'death'}] {time.monotonic() - t0:.1f}s from the kill's start")
    assert time.monotonic() - t0 < 180  # no hang: the new actors take seconds to place and load
    if restarts:
        assert llm.llm_engine.get_stats().num_worker_restarts == 1
        assert set(_actor_pids()).isdisjoint(pids) and len(_actor_pids()) == 2
    else:
        _wait_no_actors()
        with pytest.raises(EngineDeadError):  # new requests fail the same way
            _generate(llm, PROMPTS[:1])
    llm.shutdown()
    _wait_no_actors()


@pytest.mark.slow
def test_startup_failure_names_the_rank(cluster, tiny_model_dir, tmp_path):
    """A checkpoint whose k_proj is too short for rank 1 (rank 0's rows are there)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), bad)
    weights = load_file(bad / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    weights[name] = weights[name][:16].contiguous()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"rank 1[\s\S]*too few for rank 1"):
        _ray_llm(str(bad))
    assert time.monotonic() - t0 < 30
    _wait_no_actors()


@pytest.mark.slow
def test_too_many_ranks_for_the_cluster_fails_fast(cluster, tiny_model_dir):
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"4 workers .* need 4 bundles .* has 2 CPU"):
        _ray_llm(tiny_model_dir("llama"), tp=4)
    assert time.monotonic() - t0 < 30
    assert _actor_pids() == []


_SCRIPT = """
import os, sys
from distgen import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="ray", kv_cache_memory=16 << 20)
print(llm.generate([{"prompt_token_ids": [5, 6, 7]}], use_tqdm=False)[0].outputs[0].token_ids, flush=True)
"""


def _raylets() -> set[int]:
    out = set()
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    if b"/raylet" in f.read().split(b"\0")[0] and process_alive(int(d)):
                        out.add(int(d))
            except OSError:
                pass
    return out


@pytest.mark.slow
def test_local_ray_started_by_the_executor_goes_at_exit(cluster, tiny_model_dir):
    """With ``RAY_ADDRESS=local`` the executor starts its own Ray instance; a script that exits without
    shutting down leaves neither actors nor that instance behind."""
    before = _raylets()
    env = dict(os.environ, RAY_ADDRESS="local")
    cmd = [sys.executable, "-c", textwrap.dedent(_SCRIPT), tiny_model_dir("llama")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("[")
    deadline = time.monotonic() + 15
    while (_raylets() - before or _actor_pids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _raylets() - before == set(), "the Ray instance the executor started is still running"
    assert _actor_pids() == []


def test_backend_none_picks_ray_only_when_connected(monkeypatch):
    """Without Ray initialized (or imported) here and no RAY_ADDRESS, tp>1 picks mp; RAY_ADDRESS (a Ray
    job) picks ray; tp=1 stays uni."""
    code = (
        "import sys; from distgen.executor.base import Executor as E; "
        "print(E.resolve_backend(None, 2), E.resolve_backend(None, 1), 'ray' in sys.modules)"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["mp", "uni", "False"]
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["ray", "uni", "False"]
    assert Executor.resolve_backend("mp", 2) == "mp"


def test_serve_on_the_ray_cluster(cluster, tiny_model_dir):
    """`distgen serve --tp 2 --distributed-executor-backend ray` joins the cluster (RAY_ADDRESS), answers
    as one rank does, and Ctrl-C takes its actors down with it."""
    import httpx

    from tests.entrypoints.openai.conftest import start_server

    path = tiny_model_dir("llama")
    llm = LLM(path, kv_cache_memory=KV, dtype="float32")
    want = llm.generate(
        "Hello there", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False
    )
    llm.shutdown()
    server = start_server(path, "-tp", "2", "--distributed-executor-backend", "ray")
    try:
        assert len(_actor_pids()) == 2
        body = {"prompt": "Hello there", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        got = httpx.post(server.v1 + "/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want[0].outputs[0].text
    finally:
        server.stop()
    _wait_no_actors()


def test_device_follows_the_clusters_gpus(cluster, monkeypatch):
    """The engine core may run on a node without a GPU: with ranks as Ray actors, CUDA is the default
    device when the cluster has GPUs, wherever the engine runs."""
    from distgen.frontend.args import default_device

    assert default_device("ray") == "cpu"  # this test cluster has CPUs only
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "GPU": 8.0})
    assert default_device("ray") == "cuda"
    assert default_device("mp") == "cpu"  # mp ranks live on this (GPU-less) machine
