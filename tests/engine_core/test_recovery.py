"""A lost worker is replaced and its requests recomputed: a worker killed (SIGKILL), stopped (SIGSTOP,
past the step timeout) or raising mid-generation at tp 3, with greedy, seeded and n>1 requests in
flight; every request completes with the tokens of a run without the failure, no process is left, and
a worker that fails again and again exhausts the restart budget and ends the engine as before."""

from __future__ import annotations

import os
import signal
import time

import pytest

from distgen import LLM, SamplingParams
from distgen.engine_core.core import RestartBudget
from distgen.exceptions import EngineDeadError
from distgen.workers.worker import Worker
from tests.conftest import random_prompts, wait_gone

pytestmark = pytest.mark.slow
PROMPTS = random_prompts(8, seed=11)
KV = 16 << 20


@pytest.fixture(autouse=True)
def _engine_core_in_process(monkeypatch):
    """The engine core in this process, so the test can reach its executor mid-generation."""
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _requests() -> tuple[list, list[SamplingParams]]:
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True, n=2)
    return prompts, [greedy] * 6 + [seeded] * 2


def _tokens(outs) -> list[list[list[int]]]:
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def _run_with_failure(llm: LLM, fail) -> list:
    """Generate, calling ``fail(executor)`` before the engine core's 6th step."""
    core = llm.llm_engine.client.core
    step, calls = core.step, [0]

    def failing_step():
        calls[0] += 1
        if calls[0] == 6:
            fail(core.executor)
        return step()

    core.step = failing_step
    try:
        prompts, params = _requests()
        return llm.generate(prompts, params, use_tqdm=False)
    finally:
        core.step = step


@pytest.mark.parametrize(
    "how",
    ["sigkill", "sigstop", "sigkill-async"],
)
def test_a_lost_worker_is_replaced_and_every_request_completes(how, tiny_model_dir):
    llm = LLM(
        tiny_model_dir("llama-gqa3"),
        tensor_parallel_size=3,
        distributed_executor_backend="mp",
        dtype="float32",
        kv_cache_memory=KV,
        worker_step_timeout_s=3.0,
        async_scheduling=how.endswith("async"),
    )
    try:
        prompts, params = _requests()
        want = _tokens(llm.generate(prompts, params, use_tqdm=False))
        old = list(llm.llm_engine.client.core.executor.worker_pids)
        rss_before = _rss_mib(os.getpid())  # the engine core's process (this one)
        sig = signal.SIGSTOP if how == "sigstop" else signal.SIGKILL
        t0 = time.monotonic()
        got = _tokens(_run_with_failure(llm, lambda ex: os.kill(ex.worker_pids[1], sig)))
        elapsed = time.monotonic() - t0
        core = llm.llm_engine.client.core
        assert got == want  # greedy and seeded n=2 alike: recomputed, not resampled differently
        assert core.num_worker_restarts == 1 and core.num_recovered_requests == 6 + 2 * 2  # sequences
        assert wait_gone(old, timeout=10) == []  # the stopped one too
        assert set(core.executor.worker_pids).isdisjoint(old)
        took = core.last_restart_s
        print(f"[{how}] generation with one worker restart: {elapsed:.1f}s, the restart itself {took:.1f}s")
        stats = llm.llm_engine.get_stats()
        assert (stats.num_worker_restarts, stats.recovering, stats.num_running) == (1, False, 0)
        rss_after = _rss_mib(os.getpid())
        print(f"[{how}] engine-core RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after")
        assert rss_after <= rss_before * 1.1
    finally:
        llm.shutdown()


def test_a_worker_failing_every_time_exhausts_the_budget(tiny_model_dir):
    llm = LLM(
        tiny_model_dir("llama"),
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=KV,
        max_worker_restarts=1,
    )
    try:
        core = llm.llm_engine.client.core
        step = core.step

        def kill_then_step():
            try:
                os.kill(core.executor.worker_pids[1], signal.SIGKILL)
            except ProcessLookupError:  # killed at the last call; the restart comes in this step
                pass
            return step()

        core.step = kill_then_step
        with pytest.raises(EngineDeadError, match=r"rank 1 .*killed by SIGKILL"):
            llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=5), use_tqdm=False)
        assert core.num_worker_restarts == 1
    finally:
        llm.shutdown()


def test_restart_budget_counts_within_its_window():
    now = [0.0]
    budget = RestartBudget(2, 60.0, clock=lambda: now[0])
    assert budget.take() and budget.take() and not budget.take()
    now[0] = 61.0  # the first two have left the window
    assert budget.take() and budget.take() and not budget.take()
    assert not RestartBudget(0, 60.0).take()  # 0: recovery off


class RaisesOnceWorker(Worker):
    """distgen's worker, whose rank 1 raises in its 4th step the first time a run gets there (a marker
    file, named by $DISTGEN_TEST_MARKER, says it already did)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps = 0

    def submit(self, sched):
        self.steps += 1
        marker = os.environ["DISTGEN_TEST_MARKER"]
        if self.rank == 1 and self.steps == 4 and not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("simulated fault in the forward")
        return super().submit(sched)


def test_a_worker_raising_in_the_forward_is_replaced(tiny_model_dir, tmp_path, monkeypatch):
    from distgen.executor import base
    from distgen.executor.multiproc import MultiprocExecutor

    monkeypatch.setenv("DISTGEN_TEST_MARKER", str(tmp_path / "raised"))
    llm = LLM(tiny_model_dir("llama-gqa3"), dtype="float32", kv_cache_memory=KV)  # the reference, tp=1
    prompts, params = _requests()
    want = _tokens(llm.generate(prompts, params, use_tqdm=False))
    llm.shutdown()

    def create(config):
        return MultiprocExecutor(config, worker_cls=RaisesOnceWorker)

    monkeypatch.setattr(base.Executor, "create", staticmethod(create))
    llm = LLM(tiny_model_dir("llama-gqa3"), tensor_parallel_size=3, dtype="float32", kv_cache_memory=KV)
    try:
        got = _tokens(llm.generate(prompts, params, use_tqdm=False))
        core = llm.llm_engine.client.core
        assert os.path.exists(tmp_path / "raised") and core.num_worker_restarts == 1
        assert got == want
    finally:
        llm.shutdown()
