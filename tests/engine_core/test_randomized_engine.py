"""Random mixes of requests (greedy and seeded sampling, n, logprobs, prompt logprobs, min_tokens,
penalties, stop ids, structured outputs, shared prefixes) give the same tokens and logprobs under
preemption, chunked prefill, async scheduling and tp=2 as in a roomy single-rank run of the same
requests.

Seeded sampling draws per output position, so every request's tokens are fixed whatever else runs
beside it; a difference here is a bug in the engine's bookkeeping, not float noise (float32, and
the mixes avoid near-ties only by chance: a tie would show as one mismatch, the assertion lists it).
"""

from __future__ import annotations

import random

import pytest

from distgen import LLM, SamplingParams
from tests.conftest import random_prompts

pytestmark = pytest.mark.slow
TIGHT = dict(num_gpu_blocks_override=48, block_size=4, max_num_batched_tokens=32)  # preempts often
CONFIGS = {
    "preemption": TIGHT,
    "preemption-async": {**TIGHT, "async_scheduling": True},
    "tp2-preemption-async": {
        **TIGHT,
        "num_gpu_blocks_override": 64,
        "tensor_parallel_size": 2,
        "async_scheduling": True,
    },
    "chunked-async": dict(kv_cache_memory=16 << 20, max_num_batched_tokens=7, async_scheduling=True),
}


def random_requests(seed: int) -> tuple[list[dict], list[SamplingParams]]:
    rng = random.Random(seed)
    base = random_prompts(6, seed=rng.randrange(1000), lo=5, hi=60)
    tails = random_prompts(10, seed=rng.randrange(1000), lo=1, hi=20)
    prompts = base + [base[rng.randrange(len(base))] + t for t in tails]  # prefix-cache hits
    params = []
    for _ in prompts:
        kw: dict = dict(max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.5)
        if rng.random() < 0.5:
            kw.update(temperature=0)
        else:
            kw.update(temperature=rng.choice([0.5, 1.0]), seed=rng.randrange(10**6))
            kw.update(top_k=rng.choice([0, 5, 50]), top_p=rng.choice([1.0, 0.9]))
        if rng.random() < 0.3:
            kw["logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.3:
            kw["prompt_logprobs"] = rng.randint(0, 2)
        if rng.random() < 0.2:
            kw.update(n=rng.randint(2, 3), temperature=1.0, seed=rng.randrange(10**6))
        if rng.random() < 0.2:
            kw["min_tokens"] = min(kw["max_tokens"], rng.randint(0, 10))
        if rng.random() < 0.2:
            kw["presence_penalty"] = 0.5
        if rng.random() < 0.2:
            kw["stop_token_ids"] = [rng.randrange(100, 2000)]
        if rng.random() < 0.15:
            constraints = [{"regex": r"[a-z]{1,8}( [a-z]{1,8}){0,4}"}, {"choice": ["yes", "no", "not sure"]}]
            kw["structured_outputs"] = rng.choice(constraints)
        params.append(SamplingParams(**kw))
    return [{"prompt_token_ids": p} for p in prompts], params


def run(model: str, prompts, params, **engine_args):
    llm = LLM(model, dtype="float32", **engine_args)
    try:
        return llm.generate(prompts, params, use_tqdm=False), llm.llm_engine.get_stats().num_preemptions
    finally:
        llm.shutdown()


def differences(ref, got) -> list[str]:
    out = []
    for i, (a, b) in enumerate(zip(ref, got)):
        for ca, cb in zip(a.outputs, b.outputs, strict=True):
            if ca.token_ids != cb.token_ids or ca.finish_reason != cb.finish_reason:
                out.append(f"request {i} choice {ca.index}: tokens {ca.token_ids} != {cb.token_ids}")
                continue
            for la, lb in zip(ca.logprobs or [], cb.logprobs or [], strict=True):
                if la.keys() != lb.keys() or any(abs(la[t].logprob - lb[t].logprob) > 1e-3 for t in la):
                    out.append(f"request {i} choice {ca.index}: logprobs differ")
                    break
        if (a.prompt_logprobs is None) != (b.prompt_logprobs is None):
            out.append(f"request {i}: prompt logprobs missing on one side")
        elif a.prompt_logprobs is not None:
            n, want = len(b.prompt_logprobs), len(b.prompt_token_ids)
            if n != want:
                out.append(f"request {i}: {n} prompt logprobs for {want} prompt tokens")
            else:
                for pos, t in enumerate(b.prompt_token_ids[1:], 1):
                    if abs(a.prompt_logprobs[pos][t].logprob - b.prompt_logprobs[pos][t].logprob) > 1e-3:
                        out.append(f"request {i}: prompt logprob {pos} differs")
                        break
    return out


# One mix per CI run: each costs ~45 s of the 30-minute CI budget. When changing the scheduler or the
# sampler, run more seeds here by hand (seed 1 passes too).
@pytest.mark.parametrize("seed", [5])
def test_random_mixes_agree_across_engine_configurations(tiny_model_dir, seed):
    model = tiny_model_dir("llama")
    prompts, params = random_requests(seed)
    ref, _ = run(model, prompts, params, kv_cache_memory=16 << 20)
    for name, cfg in CONFIGS.items():
        got, preemptions = run(model, prompts, params, **cfg)
        assert not differences(ref, got), (name, differences(ref, got))
        if "preemption" in name:
            assert preemptions > 0, f"{name}: the configuration no longer preempts; make it tighter"
