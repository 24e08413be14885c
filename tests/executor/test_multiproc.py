"""The ``mp`` executor: tensor-parallel greedy outputs match tp=1 and transformers, each rank holds only
its shard, and startup failures, dead workers and shutdown leave no process or socket file behind."""

from __future__ import annotations

import functools
import gc
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from distgen import LLM, SamplingParams
from distgen.distributed import parallel_state as ps
from distgen.distributed.parallel_state import split_range
from distgen.exceptions import EngineDeadError, WorkerStartupError
from distgen.frontend.args import EngineArgs
from distgen.kernels import dispatch
from distgen.model_loader.loader import build_model, resolve_model
from distgen.sampling_spec import SamplingSpec
from distgen.workers.scheduler_output import NewRequestData, SchedulerOutput
from tests.conftest import check_greedy_close, process_alive, random_prompts, wait_gone

MAX_NEW = 10
PROMPTS = random_prompts(12, seed=3)
KV = 16 << 20
PREEMPTION = dict(num_gpu_blocks_override=40, block_size=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(autouse=True)
def _engine_core_in_process(monkeypatch):
    """These tests reach into the executor, so the engine core runs in the test's process (the split
    into an engine-core process is tested in tests/frontend/test_core_client.py)."""
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")


def _spawned_children() -> list[int]:
    """Live or unreaped worker processes of this process (multiprocessing's resource tracker excluded)."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == os.getpid() and (b"spawn_main" in cmd or state == "Z"):
            found.append(int(d))
    return found


def _tp2(path: str, **kwargs) -> LLM:
    return LLM(path, tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=KV, **kwargs)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def references(hf_reference):
    return lambda arch: hf_reference(arch, PROMPTS, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,tp,scenario",
    [
        ("llama", 2, "plain"),
        ("llama", 4, "preemption"),  # 2 KV heads on 4 ranks: each KV head replicated twice
        ("qwen2", 2, "preemption"),
        ("qwen2", 4, "plain"),
        ("opt", 2, "prefix-cache"),
        ("opt", 4, "plain"),
        ("mistral", 4, "plain"),  # 1 KV head on every rank
        ("qwen3", 2, "plain"),
        # Async scheduling: rank 0 broadcasts its samples; every rank fills its next inputs from them.
        ("llama", 2, "async"),
        ("qwen2", 4, "async-preemption"),
        # Uneven splits: query heads 2/1/1, MLP 43/43/42, a KV head held by two ranks.
        ("llama", 3, "preemption"),
        ("qwen3", 3, "prefix-cache"),
        # 6 query heads in groups of 3 at tp 4: ranks 1 and 2 start inside a group.
        ("llama-gqa3", 4, "async-preemption"),
    ],
)
def test_tp_greedy_matches_tp1(arch, tp, scenario, tiny_model_dir, references):
    kwargs = dict(
        dtype="float32", kv_cache_memory=KV, **(PREEMPTION if scenario.endswith("preemption") else {})
    )
    # prefix-cache: every prompt twice in one batch, so the later copies hit the cache.
    prompts, refs = PROMPTS, references(arch)
    if scenario == "prefix-cache":
        prompts, refs, kwargs["block_size"] = PROMPTS * 2, refs * 2, 4
    llm1 = LLM(tiny_model_dir(arch), **kwargs)
    base = _generate(llm1, prompts)
    llm1.shutdown()
    t0 = time.monotonic()
    async_scheduling = scenario.startswith("async")
    llm = LLM(
        tiny_model_dir(arch),
        tensor_parallel_size=tp,
        distributed_executor_backend="mp",
        async_scheduling=async_scheduling,
        **kwargs,
    )
    t_start = time.monotonic() - t0
    core = llm.llm_engine.client.core
    pids = core.executor.worker_pids
    t0 = time.monotonic()
    got = _generate(llm, prompts)
    print(f"[{arch} tp={tp} {scenario}] start {t_start:.1f}s, generate {time.monotonic() - t0:.1f}s")
    if scenario.endswith("preemption"):
        assert core.scheduler.num_preemptions > 0
    if scenario == "prefix-cache":
        assert core.scheduler.kv.pool.num_hits > 0
    assert core.scheduler.kv.pool.num_free_blocks == core.num_blocks
    same = sum(a == b for a, b in zip(got, base)) / len(base)
    print(f"[{arch} tp={tp} {scenario}] identical to tp=1: {same:.0%}")
    check_greedy_close(
        refs, got, f"{arch}/tp{tp}/{scenario}"
    )  # DESIGN.md's rule; prints the exact-match rate
    llm.shutdown()
    assert wait_gone(pids, timeout=10) == []


@pytest.mark.slow
def test_uneven_tp_on_the_torch_attention_path(tiny_model_dir, references, monkeypatch):
    """The torch and Triton paths take whole KV groups: a rank's partial group is padded with zero
    queries (``Attention.forward``, shared by both; the Triton kernels are unchanged, and the padded
    path runs them in the interpreter too, too slowly for every run). tp=4 of 6 heads in groups of 3
    (ranks 1 and 2 start inside a group) against tp=1 on the same path."""
    mode = "torch"
    monkeypatch.setenv("DISTGEN_KERNELS", mode)  # the workers read it at start
    prompts, refs = PROMPTS[:4], references("llama-gqa3")[:4]
    with dispatch.kernel_mode(mode):  # the tp=1 worker runs in this process
        llm1 = LLM(tiny_model_dir("llama-gqa3"), dtype="float32", kv_cache_memory=KV)
        base = _generate(llm1, prompts)
        llm1.shutdown()
    llm = LLM(
        tiny_model_dir("llama-gqa3"),
        tensor_parallel_size=4,
        distributed_executor_backend="mp",
        dtype="float32",
        kv_cache_memory=KV,
    )
    got = _generate(llm, prompts)
    llm.shutdown()
    assert got == base
    check_greedy_close(refs, got, f"llama-gqa3/tp4/{mode}")


SMOLLM2_TEXTS = ["The capital of France is", "def fibonacci(n):", "Why is the sky blue?", "Once upon a time,"]


def smollm2_greedy(tp: int, pp: int = 1) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    llm = LLM(
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        kv_cache_memory=64 << 20,
        block_size=4,
        dtype="float32",
    )
    outs = llm.generate(SMOLLM2_TEXTS * 2, params, use_tqdm=False)  # the second copies hit the cache
    assert llm.llm_engine.client.core.scheduler.kv.pool.num_hits > 0
    llm.shutdown()
    return [o.outputs[0].token_ids for o in outs]


@functools.cache
def smollm2_tp1() -> list[list[int]]:
    return smollm2_greedy(1)  # once for the tests below, run with their in-process engine core


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_smollm2_any_tp_matches_tp1(tp):
    """The default model (9 heads, 3 KV heads) at the sizes that split it unevenly: 5/4 and 3/2/2/2
    heads, the KV heads a rank's queries straddle held by both ranks (even splits: the tiny models at
    tp 2 and 3 above)."""
    assert smollm2_greedy(tp) == smollm2_tp1()
    assert _spawned_children() == []


@pytest.mark.parametrize("arch,tp", [("llama", 2), ("llama", 3), ("llama", 4), ("llama-gqa3", 4)])
def test_each_rank_loads_only_its_shard(arch, tp, tiny_model_dir, monkeypatch):
    """Build the tp-way model in-process as each rank would and compare its tensors to the full ones."""
    path = tiny_model_dir(arch)
    full = load_file(os.path.join(path, "model.safetensors"))
    source = resolve_model(path)
    hidden, inter = (64, 128) if arch == "llama" else (96, 120)  # 16 dims per head in both
    p = "model.layers.0."
    for rank in range(tp):
        monkeypatch.setitem(ps._STATE, "tp", ps._TPGroup(rank, tp, None))
        model = build_model(source, torch.float32, "cpu")
        attn = model.layers[0].self_attn
        s = attn.qkv_proj.shard
        hd = 16
        q_rows, kv_rows = s.num_heads * hd, s.num_kv_heads * hd
        qkv = attn.qkv_proj.weight
        assert qkv.shape == (q_rows + 2 * kv_rows, hidden)
        q0, kv0 = s.q_start * hd, s.kv_start * hd
        torch.testing.assert_close(qkv[:q_rows], full[p + "self_attn.q_proj.weight"][q0 : q0 + q_rows])
        k = full[p + "self_attn.k_proj.weight"][kv0 : kv0 + kv_rows]
        torch.testing.assert_close(qkv[q_rows : q_rows + kv_rows], k)
        o = attn.o_proj.weight
        assert o.shape == (hidden, q_rows)
        torch.testing.assert_close(o, full[p + "self_attn.o_proj.weight"][:, q0 : q0 + q_rows])
        start, n = split_range(inter, tp, rank)
        gate_up = model.layers[0].mlp.gate_up_proj.weight
        torch.testing.assert_close(gate_up[:n], full[p + "mlp.gate_proj.weight"][start : start + n])
        torch.testing.assert_close(gate_up[n:], full[p + "mlp.up_proj.weight"][start : start + n])
        down = model.layers[0].mlp.down_proj.weight
        torch.testing.assert_close(down, full[p + "mlp.down_proj.weight"][:, start : start + n])
        emb = model.embed_tokens.weight
        rows = -(-49152 // tp)
        got = emb[: min(rows, 49152 - rank * rows)]
        torch.testing.assert_close(got, full["model.embed_tokens.weight"][rank * rows : (rank + 1) * rows])


def test_tp_past_the_head_count_fails_before_any_process(tiny_model_dir):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=5 .* 4 attention heads"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=5, distributed_executor_backend="mp")
    assert _spawned_children() == []
    # SmolLM2: 9 heads, 3 KV heads: every size from 1 to 9 fits.
    for tp in (2, 3, 4, 9):
        EngineArgs(tensor_parallel_size=tp).create_config()
    with pytest.raises(ValueError, match="it has 9 attention heads, and every rank needs at least one"):
        EngineArgs(tensor_parallel_size=10).create_config()


@pytest.mark.slow
def test_startup_failure_names_the_rank(tiny_model_dir, tmp_path):
    """A checkpoint whose k_proj is too short for rank 1 (rank 0's rows are there)."""
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir("llama"), bad)
    weights = load_file(bad / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight"
    weights[name] = weights[name][:16].contiguous()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    t0 = time.monotonic()
    with pytest.raises(WorkerStartupError, match=r"rank 1[\s\S]*too few for rank 1"):
        LLM(str(bad), tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=KV)
    assert time.monotonic() - t0 < 30
    assert _spawned_children() == []


@pytest.mark.slow
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
def test_worker_killed_mid_generation_raises_engine_dead(tiny_model_dir, async_scheduling):
    """With recovery off (tests/engine_core/test_recovery.py has it on)."""
    llm = LLM(
        tiny_model_dir("llama"),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=KV,
        async_scheduling=async_scheduling,
        max_worker_restarts=0,
    )
    executor = llm.llm_engine.client.core.executor
    pids, ipc_dir = executor.worker_pids, executor.ipc_dir
    broadcast, calls = executor._broadcast, []

    def broadcast_then_kill(msg):
        broadcast(msg)
        calls.append(msg)
        if len(calls) == 3:  # rank 1 dies while the step it was just sent is in flight
            os.kill(pids[1], signal.SIGKILL)

    executor._broadcast = broadcast_then_kill
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 .*killed by SIGKILL"):
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert time.monotonic() - t0 < 30
    assert wait_gone(pids, timeout=1) == []
    assert _spawned_children() == [] and not os.path.exists(ipc_dir)
    with pytest.raises(EngineDeadError):  # new requests fail the same way
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], params, use_tqdm=False)
    llm.shutdown()


@pytest.mark.slow
def test_worker_raising_makes_engine_dead(tiny_model_dir):
    """A step the workers cannot run (a block id past the cache) raises in every rank's forward."""
    llm = _tp2(tiny_model_dir("llama"), max_worker_restarts=0)
    executor = llm.llm_engine.client.core.executor
    pids = executor.worker_pids
    bad = NewRequestData("x", [5, 6, 7], 3, SamplingSpec(temperature=0.0), [10**6], 0)
    with pytest.raises(EngineDeadError, match=r"worker rank \d raised IndexError"):
        executor.execute_model(SchedulerOutput([bad], [], {"x": 3}, 3))
    assert wait_gone(pids, timeout=1) == []
    with pytest.raises(EngineDeadError):
        _generate(llm, PROMPTS[:1])
    llm.shutdown()


class _ReadBackFails:
    def get(self):
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


class BrokenReadBackWorker:
    """A model-less rank whose launched steps fail when rank 0 reads their output back."""

    def __init__(self, config, rank: int = 0, init_method=None, device_index=None) -> None:
        self.rank = rank

    def determine_num_blocks(self) -> int:
        return 64

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def submit(self, sched):
        return _ReadBackFails() if self.rank == 0 else None

    def shutdown(self) -> None:
        pass


@pytest.mark.slow
def test_a_read_back_failing_in_the_reply_thread_makes_engine_dead(tiny_model_dir):
    """Under async scheduling rank 0 reads step outputs back in a thread of its own: an error there
    (a CUDA fault shows up at that point) reaches the executor, named, instead of a silent hang."""
    from distgen.executor.multiproc import MultiprocExecutor

    config = EngineArgs(
        model=tiny_model_dir("llama"),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=KV,
        async_scheduling=True,
    ).create_config()
    executor = MultiprocExecutor(config, worker_cls=BrokenReadBackWorker)
    try:
        pids = executor.worker_pids
        assert executor.determine_num_blocks() == 64
        step = executor.submit(SchedulerOutput([], [], {}, 0))
        with pytest.raises(
            EngineDeadError, match="rank 0 raised RuntimeError: CUDA error: an illegal memory"
        ):
            step.get()
    finally:
        executor.shutdown()
    assert wait_gone(pids, timeout=10) == []


@pytest.mark.slow
def test_del_llm_leaves_no_process_or_socket_file(tiny_model_dir):
    llm = LLM(
        tiny_model_dir("qwen2"), tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=KV
    )
    _generate(llm, PROMPTS[:2])
    executor = llm.llm_engine.client.core.executor
    pids, ipc_dir = executor.worker_pids, executor.ipc_dir
    assert os.path.isdir(ipc_dir) and all(process_alive(p) for p in pids)
    del llm, executor
    gc.collect()
    assert wait_gone(pids, timeout=1) == []
    assert _spawned_children() == [] and not os.path.exists(ipc_dir)


_SCRIPT = """
import faulthandler, os, signal, sys
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if we do not exit
# A user's Ctrl-C raises KeyboardInterrupt; but a test run started in the background by a non-interactive
# shell inherits SIGINT ignored, and Python then leaves it ignored: restore what a terminal would give.
signal.signal(signal.SIGINT, signal.default_int_handler)
from distgen import LLM
llm = LLM(sys.argv[1], tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=16 << 20)
ex = llm.llm_engine.client.core.executor
print(" ".join(map(str, ex.worker_pids)), ex.ipc_dir, flush=True)
if sys.argv[2] == "hang":
    import time
    time.sleep(600)
elif sys.argv[2] == "generate":
    while True:
        llm.generate(["Hello"] * 8, use_tqdm=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["exit", "parent-killed", "ctrl-c"])
def test_no_orphans_when_the_parent_goes(how, tiny_model_dir, tmp_path):
    """Interpreter exit without shutdown, a SIGKILLed parent, and Ctrl-C mid-generation (SIGINT to
    the whole process group): the workers and the socket directory go too."""
    mode = {"exit": "exit", "parent-killed": "hang", "ctrl-c": "generate"}[how]
    cmd = [sys.executable, "-c", textwrap.dedent(_SCRIPT), tiny_model_dir("llama"), mode]
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().split()
        assert line, "the child script printed nothing: " + stderr.read_text()[-3000:]
        pids, ipc_dir = [int(p) for p in line[:-1]], line[-1]
        if how == "parent-killed":
            proc.kill()
        elif how == "ctrl-c":
            time.sleep(1.0)
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # where is it stuck?
            time.sleep(2.0)
            pytest.fail(f"the script did not exit within 60 s; its stacks:\n{stderr.read_text()[-6000:]}")
        assert wait_gone(pids, timeout=15) == []
        assert not os.path.exists(ipc_dir)
    finally:
        proc.kill()
        proc.wait()
