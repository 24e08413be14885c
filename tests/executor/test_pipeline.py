"""Pipeline parallelism on the ``mp`` executor: greedy outputs equal pp=1's (and transformers'), each
stage loads only its layers, micro-batches keep one step in flight per stage, sizes that cannot work
fail before any process starts, and a lost stage worker is replaced or ends the engine cleanly.
(The Ray backend: tests/executor/test_ray.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from distgen import LLM, SamplingParams
from distgen.distributed import parallel_state as ps
from distgen.exceptions import EngineDeadError
from distgen.frontend.args import EngineArgs
from distgen.model_loader.loader import build_model, resolve_model
from tests.conftest import check_greedy_close, random_prompts, wait_gone
from tests.executor.test_multiproc import smollm2_greedy, smollm2_tp1

MAX_NEW = 10
PROMPTS = random_prompts(12, seed=7)
KV = 16 << 20
PREEMPTION = dict(num_gpu_blocks_override=40, block_size=4, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(autouse=True)
def _engine_core_in_process(monkeypatch):
    """The tests reach into the engine core and its executor."""
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _record_steps(core) -> list[tuple[int, int]]:
    """Wrap the executor's submit: for each launched step, how many steps are in flight with it, and
    the most tokens any request has pending (sampled in a step not collected yet)."""
    submit, seen = core.executor.submit, []

    def recording(sched):
        pending = max((r.num_pending for r in core.scheduler.requests.values()), default=0)
        seen.append((len(core._in_flight) + 1, pending))
        return submit(sched)

    core.executor.submit = recording
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch,tp,pp,scenario",
    [
        ("llama-4l", 1, 2, "preemption"),
        ("llama-4l", 1, 3, "chunked-prefill"),
        ("qwen3-4l", 1, 3, "prefix-cache"),
        ("qwen3-4l", 2, 2, "preemption"),
    ],
)
def test_pp_greedy_matches_pp1(arch, tp, pp, scenario, tiny_model_dir, hf_reference):
    kwargs: dict = dict(dtype="float32", kv_cache_memory=KV)
    if scenario == "preemption":
        kwargs.update(PREEMPTION)
    if scenario == "chunked-prefill":  # prompts of up to 60 tokens in chunks of at most 16
        kwargs.update(max_num_batched_tokens=16, block_size=4)
    prompts, refs = PROMPTS, hf_reference(arch, PROMPTS, MAX_NEW)
    if scenario == "prefix-cache":  # every prompt twice in one batch: the later copies hit the cache
        prompts, refs, kwargs["block_size"] = PROMPTS * 2, refs * 2, 4
    base_kwargs = dict(kwargs, tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None)
    llm1 = LLM(tiny_model_dir(arch), **base_kwargs)
    base = _generate(llm1, prompts)
    llm1.shutdown()
    llm = LLM(
        tiny_model_dir(arch),
        **dict(base_kwargs, pipeline_parallel_size=pp, distributed_executor_backend="mp"),
    )
    core = llm.llm_engine.client.core
    pids = core.executor.worker_pids
    assert len(pids) == tp * pp
    steps = _record_steps(core)
    got = _generate(llm, prompts)
    if scenario == "preemption":
        assert core.scheduler.num_preemptions > 0
    if scenario == "prefix-cache":
        assert core.scheduler.kv.pool.num_hits > 0
    assert core.scheduler.kv.pool.num_free_blocks == core.num_blocks
    # Micro-batches: up to pp steps in flight, and no request samples in two of them at once (a long
    # prompt's chunks may follow each other down the pipeline).
    assert max(depth for depth, _ in steps) == pp
    assert max(pending for _, pending in steps) == 1
    # Stages change no arithmetic: pp alone gives pp=1's tokens exactly.
    assert got == base
    check_greedy_close(refs, got, f"{arch}/tp{tp}/pp{pp}/{scenario}")
    llm.shutdown()
    assert wait_gone(pids, timeout=10) == []


@pytest.mark.slow
def test_smollm2_pp2_matches_pp1():
    """The default model (30 layers, tied head: the last stage's head loads the embedding) in two
    stages of 15 layers, with prefix-cache hits."""
    assert smollm2_greedy(1, pp=2) == smollm2_tp1()


@pytest.mark.parametrize("layers", [(2, 2), (3, 1), (1, 1, 1, 1)])
def test_each_stage_loads_only_its_layers(layers, tiny_model_dir, monkeypatch):
    """Build each stage in-process as its rank would: its layers are the checkpoint's, renumbered."""
    path = tiny_model_dir("llama-4l")  # tied embeddings: the last stage's head takes the embedding
    full = load_file(os.path.join(path, "model.safetensors"))
    source = resolve_model(path)
    start, pp = 0, len(layers)
    for stage in range(pp):
        monkeypatch.setitem(ps._STATE, "pp", ps._Pipeline(stage, pp, 1, layers))
        model = build_model(source, torch.float32, "cpu")
        names = {n for n, _ in model.named_parameters()}
        n = len(model.layers)
        assert n == layers[stage] and model.start_layer == start
        assert ("embed_tokens.weight" in names) == (stage == 0)
        assert ("norm.weight" in names) == (stage == pp - 1)
        for i in range(n):
            got = model.layers[i].mlp.down_proj.weight
            torch.testing.assert_close(got, full[f"model.layers.{start + i}.mlp.down_proj.weight"])
        if stage == pp - 1:
            torch.testing.assert_close(model.lm_head.weight, full["model.embed_tokens.weight"])
        assert len(model.attention_layers()) == n  # and so the stage's KV cache holds n layers
        start += n


def test_stages_balance_the_lm_head(monkeypatch):
    """The last stage runs the LM head for every sampling token: SmolLM2's (49152 x 576) weighs about
    8 of its layers, so at pp 2 the last stage takes 11 of the 30 layers; an override sets them."""
    monkeypatch.delenv("DISTGEN_PP_LAYER_PARTITION", raising=False)
    for pp, want in [(2, (19, 11)), (3, (13, 12, 5)), (30, (1,) * 30)]:
        config = EngineArgs(pipeline_parallel_size=pp).create_config()
        assert config.parallel.pipeline_layers == want
    monkeypatch.setenv("DISTGEN_PP_LAYER_PARTITION", "20, 10")
    assert EngineArgs(pipeline_parallel_size=2).create_config().parallel.pipeline_layers == (20, 10)
    monkeypatch.setenv("DISTGEN_PP_LAYER_PARTITION", "20,11")
    with pytest.raises(ValueError, match=r"partition \[20, 11\] must give each of the 2 stages .* 30 layers"):
        EngineArgs(pipeline_parallel_size=2).create_config()
    monkeypatch.setenv("DISTGEN_PP_LAYER_PARTITION", "20;10")
    with pytest.raises(ValueError, match="DISTGEN_PP_LAYER_PARTITION must be comma-separated"):
        EngineArgs(pipeline_parallel_size=2).create_config()


def test_pp_sizes_that_cannot_work_fail_before_any_process(tiny_model_dir):
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 .* 2 layers, and every stage needs"):
        LLM(tiny_model_dir("llama"), pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline parallelism is not supported for OPTForCausalLM"):
        LLM(tiny_model_dir("opt"), pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size must be >= 1"):
        EngineArgs(pipeline_parallel_size=0).create_config()
    with pytest.raises(ValueError, match=r"'uni' executor runs one worker; 2 workers"):
        LLM(tiny_model_dir("llama"), pipeline_parallel_size=2, distributed_executor_backend="uni")
    config = EngineArgs(tensor_parallel_size=3, pipeline_parallel_size=2).create_config()
    assert config.parallel.world_size == 6 and config.parallel.distributed_executor_backend == "mp"


@pytest.mark.slow
@pytest.mark.parametrize("restarts", [0, 3], ids=["recovery-off", "recovery-on"])
def test_stage_worker_killed_mid_generation(restarts, tiny_model_dir):
    """The last stage's worker (the driver) is killed while micro-batches are in flight: with recovery
    every request completes with the tokens of the run without the kill; without, every request ends
    with EngineDeadError within seconds. No worker is left either way."""
    path = tiny_model_dir("llama-4l")
    llm1 = LLM(path, dtype="float32", kv_cache_memory=KV)
    base = _generate(llm1, PROMPTS)
    llm1.shutdown()
    llm = LLM(
        path,
        dtype="float32",
        kv_cache_memory=KV,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        max_worker_restarts=restarts,
    )
    core = llm.llm_engine.client.core
    pids = core.executor.worker_pids
    submit, calls = core.executor.submit, []

    def submit_then_kill(sched):
        out = submit(sched)
        calls.append(sched)
        if len(calls) == 4:
            os.kill(pids[1], signal.SIGKILL)
        return out

    core.executor.submit = submit_then_kill
    t0 = time.monotonic()
    if restarts:
        assert _generate(llm, PROMPTS) == base
        assert core.num_worker_restarts == 1
    else:
        with pytest.raises(EngineDeadError, match=r"rank 1 .*killed by SIGKILL"):
            _generate(llm, PROMPTS)
    print(f"[pp2 kill, restarts={restarts}] {time.monotonic() - t0:.1f}s")
    assert time.monotonic() - t0 < 30
    assert wait_gone(pids, timeout=10) == []
    llm.shutdown()
