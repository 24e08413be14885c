"""Greedy outputs equal transformers' on the same weights, whatever the batching, chunking,
prefix-cache hits, preemptions or async scheduling (DESIGN.md's rule for near-tie flips)."""

from __future__ import annotations

import pytest

from distgen import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, assert_engine_idle_and_empty, check_greedy_close, random_prompts

MAX_NEW = 12
PROMPTS = random_prompts(16, seed=1) + [random_prompts(1, seed=2, lo=150, hi=150)[0]]

SCENARIOS = {
    "one-batch": dict(),
    "reordered": dict(),
    "chunked-prefill": dict(max_num_batched_tokens=7),
    "preemption": dict(num_gpu_blocks_override=48, block_size=4, max_num_batched_tokens=64),
    "prefix-cache": dict(block_size=4),
    # The next step scheduled while the last one's tokens are on their way (one worker).
    "async-scheduling": dict(async_scheduling=True),
    "async-preemption": dict(
        async_scheduling=True, num_gpu_blocks_override=48, block_size=4, max_num_batched_tokens=64
    ),
    "async-chunked-prefill": dict(async_scheduling=True, max_num_batched_tokens=7),
}


@pytest.fixture(scope="module")
def references(hf_reference):
    return lambda arch: hf_reference(arch, PROMPTS, MAX_NEW)


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_matches_transformers(arch, scenario, tiny_model_dir, references):
    refs = references(arch)
    kwargs = {"kv_cache_memory": 16 << 20, **SCENARIOS[scenario]}
    llm = LLM(tiny_model_dir(arch), dtype="float32", seed=0, **kwargs)
    if scenario == "reordered":
        order = list(range(len(PROMPTS)))[::2] + list(range(len(PROMPTS)))[1::2][::-1]
        outs = _generate(llm, [PROMPTS[i] for i in order])
        got = [None] * len(PROMPTS)
        for pos, i in enumerate(order):
            got[i] = outs[pos]
    elif scenario == "prefix-cache":
        # Every prompt twice in one batch, then the whole batch again: later copies hit the cache.
        got = _generate(llm, PROMPTS + PROMPTS)
        check_greedy_close(refs, got[len(PROMPTS) :], f"{arch}/{scenario}/dup")
        got = _generate(llm, PROMPTS)
        assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    else:
        got = _generate(llm, PROMPTS)
    if scenario.endswith("preemption"):
        assert llm.llm_engine.get_stats().num_preemptions > 0
    rate = check_greedy_close(refs, got, f"{arch}/{scenario}")
    assert rate >= 0.5, f"{arch}/{scenario}: only {rate:.0%} of sequences match exactly"
    assert_engine_idle_and_empty(llm)
