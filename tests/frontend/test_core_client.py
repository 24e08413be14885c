"""The engine core in its own process: same outputs as in-process, a dead core or worker becomes
EngineDeadError quickly, and no process or socket directory outlives the front end."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from distgen import LLM, SamplingParams
from distgen.exceptions import EngineDeadError
from tests.conftest import process_alive, random_prompts, wait_gone

pytestmark = pytest.mark.slow
KV = 16 << 20
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": p} for p in random_prompts(6, seed=11)]


def test_engine_core_runs_in_its_own_process_with_the_same_outputs(tiny_model_dir, monkeypatch):
    llm = LLM(tiny_model_dir("llama"), kv_cache_memory=KV)
    client = llm.llm_engine.client
    assert client.pid != os.getpid() and process_alive(client.pid)
    split = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    pid, ipc_dir = client.pid, client.ipc_dir
    llm.shutdown()
    assert wait_gone([pid]) == [] and not os.path.exists(ipc_dir)

    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")
    inproc = LLM(tiny_model_dir("llama"), kv_cache_memory=KV)
    assert inproc.llm_engine.client.ready.pid == os.getpid()
    assert [o.outputs[0].token_ids for o in inproc.generate(PROMPTS, GREEDY, use_tqdm=False)] == split


def _children() -> set[int]:
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def test_start_up_work_runs_while_the_core_boots_and_a_failure_stops_the_core(tiny_model_dir):
    """The front end loads its tokenizer while the engine core process loads the model; if that fails,
    the core it started is stopped, not left behind."""
    from distgen.frontend.args import EngineArgs
    from distgen.frontend.core_client import EngineCoreClient

    config = EngineArgs(model=tiny_model_dir("llama"), kv_cache_memory=KV).create_config()
    before = _children()
    started: list[set[int]] = []

    def fail() -> None:
        started.append(_children() - before)  # the core is already running by now
        raise RuntimeError("tokenizer broke")

    with pytest.raises(RuntimeError, match="tokenizer broke"):
        EngineCoreClient.make(config, while_starting=fail)
    assert len(started) == 1 and len(started[0]) == 1, started
    assert wait_gone(list(started[0])) == []


@pytest.mark.parametrize("tp", [1, 2])
def test_a_setting_the_model_cannot_take_fails_with_its_message_and_no_stack(tp, tiny_model_dir, capfd):
    """The core (or a worker) finds a KV budget under one block only once the model is built; the
    front end raises it with the core's message, and the core's stderr held a full traceback too."""
    with pytest.raises(ValueError, match=r"the KV cache budget \(1 bytes\) does not fit one block"):
        LLM(tiny_model_dir("llama"), kv_cache_memory=1, tensor_parallel_size=tp)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ERROR" not in err, err


def test_a_request_the_core_cannot_decode_ends_alone(tiny_model_dir):
    """Defence in depth behind the front end's checks: a request that fails the engine core's decoding
    (here a prompt with a string among its token ids, past the front end's input processor) is ended
    as aborted and logged; the engine keeps serving everyone else."""
    from distgen.engine_core.messages import EngineCoreRequest
    from distgen.sampling_spec import SamplingSpec

    llm = LLM(tiny_model_dir("llama"), kv_cache_memory=KV)
    client = llm.llm_engine.client
    # Encodes (msgpack takes any value), fails the engine core's typed decoding.
    client.add_request(EngineCoreRequest("bad", [5, "six", 7], SamplingSpec(max_tokens=2), time.time()))
    ended = None
    deadline = time.monotonic() + 30
    while ended is None and time.monotonic() < deadline:
        ended = next((o for o in client.get_output().outputs if o.request_id == "bad"), None)
    assert ended is not None and ended.finish_reason == "abort" and ended.new_token_ids == []
    out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    llm.shutdown()


def test_killed_engine_core_raises_engine_dead(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen2"), kv_cache_memory=KV)
    client = llm.llm_engine.client
    engine = llm.llm_engine
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=900, ignore_eos=True))
    engine.step()  # in flight
    os.kill(client.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match="SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - t0 < 5
    with pytest.raises(EngineDeadError):
        llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
    assert not os.path.exists(client.ipc_dir)


def test_tp_worker_killed_behind_the_engine_core(tiny_model_dir):
    """With recovery off: the engine ends (tests/engine_core/test_recovery.py has it on)."""
    llm = LLM(
        tiny_model_dir("llama"),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=KV,
        max_worker_restarts=0,
    )
    ready = llm.llm_engine.client.ready
    assert len(ready.worker_pids) == 2
    engine = llm.llm_engine
    engine.add_request({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=900, ignore_eos=True))
    engine.step()
    os.kill(ready.worker_pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(EngineDeadError, match=r"rank 1 .*SIGKILL"):
        while engine.has_unfinished_requests():
            engine.step()
    assert time.monotonic() - t0 < 30
    assert wait_gone([ready.pid, *ready.worker_pids]) == []


def test_del_llm_stops_core_and_workers(tiny_model_dir):
    llm = LLM(
        tiny_model_dir("llama"), tensor_parallel_size=2, distributed_executor_backend="mp", kv_cache_memory=KV
    )
    llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    ready, ipc_dir = llm.llm_engine.client.ready, llm.llm_engine.client.ipc_dir
    del llm
    gc.collect()
    assert wait_gone([ready.pid, *ready.worker_pids]) == []
    assert not os.path.exists(ipc_dir)


SCRIPT = """
import os, sys
from distgen import LLM, SamplingParams
# No `if __name__ == "__main__":` guard: the engine core starts in a fresh interpreter.
llm = LLM(sys.argv[1], tensor_parallel_size=2, kv_cache_memory=16 << 20)
out = llm.generate("Hello", SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
ready = llm.llm_engine.client.ready
print("DIR", llm.llm_engine.client.ipc_dir, flush=True)
print("PIDS", ready.pid, *ready.worker_pids, flush=True)
if sys.argv[2] == "kill":
    os.kill(os.getpid(), 9)
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_unguarded_script_and_parent_exit_leave_nothing(tiny_model_dir, tmp_path, how):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run(
        [sys.executable, str(script), tiny_model_dir("llama"), how],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PIDS")), None)
    assert line is not None, proc.stderr[-3000:]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 3
    assert proc.returncode == (0 if how == "exit" else -9), proc.stderr[-3000:]
    assert wait_gone(pids) == [], "engine core or workers outlived their parent"
    ipc_dir = next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("DIR"))
    assert not os.path.exists(ipc_dir), "the socket directory outlived the processes"


def test_requests_queue_for_a_busy_core_without_blocking_the_front_end(tiny_model_dir):
    """The core reads its input between steps. Past ZeroMQ's default high-water mark (1000 queued
    messages) a send blocked until it did, so an n=3000 request froze the front end (the server's
    event loop) for as long as the core was busy; here the core is stopped outright."""
    import threading

    llm = LLM(tiny_model_dir("llama"), kv_cache_memory=KV, max_model_len=64)
    engine = llm.llm_engine
    os.kill(engine.client.pid, signal.SIGSTOP)
    try:
        ids: list[str] = []
        sender = threading.Thread(
            target=lambda: ids.append(engine.add_request("Hi", SamplingParams(n=3000, max_tokens=1)))
        )
        sender.start()
        sender.join(timeout=30)
        assert not sender.is_alive(), "adding a request blocked on a core that was not reading"
    finally:
        os.kill(engine.client.pid, signal.SIGCONT)
    sender.join()
    engine.abort_request(ids)
    out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
    llm.shutdown()
