"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers on the same
dequantized weights: greedy tokens equal under batching, chunking, prefix caching and preemption."""

from __future__ import annotations

import pytest
import torch

from distgen import LLM, SamplingParams
from distgen.model_loader.gguf import default_model_path, read_gguf
from tests.conftest import assert_engine_idle_and_empty, check_greedy_close, hf_greedy

MAX_NEW = 10
TEXTS = [
    "Hello, my name is",
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "In 1969, the first humans",
    "List three primary colors:",
    "The quick brown fox",
    "Translate to French: good morning",
    "Why is the sky blue?",
    "Once upon a time, in a small village,",
    "The derivative of x squared is",
    "import numpy as np\n",
    "Q: What is 12 times 7?\nA:",
    "My favourite food is",
    "Climate change is caused by",
    "Dear hiring manager, I am writing to apply for the position of software engineer at your company, "
    "where I hope to bring my experience in distributed systems and machine learning. " * 3,
]


@pytest.fixture(scope="module")
def smol():
    ckpt = read_gguf(default_model_path())
    tok = ckpt.load_tokenizer()
    prompts = [tok(t).input_ids for t in TEXTS]
    import transformers as tf

    cfg = {k: v for k, v in ckpt.hf_config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg)).eval()
    state = dict(ckpt.iter_weights())
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model.load_state_dict(state, strict=True)
    return prompts, hf_greedy(model, prompts, MAX_NEW)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["one-batch", "chunked-prefill+prefix-cache", "preemption"])
def test_smollm2_greedy_matches_transformers(smol, scenario):
    prompts, refs = smol
    kwargs = {
        "one-batch": dict(enable_prefix_caching=False),
        "chunked-prefill+prefix-cache": dict(max_num_batched_tokens=32, block_size=8),
        "preemption": dict(num_gpu_blocks_override=16, block_size=16),
    }[scenario]
    llm = LLM(dtype="float32", quantization="none", **kwargs)  # the float path, dequantized at load
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    if scenario == "chunked-prefill+prefix-cache":
        reqs = reqs[::-1] + reqs  # reversed order, then again: the second half hits the cache
        outs = llm.generate(reqs, params, use_tqdm=False)
        got = [o.outputs[0].token_ids for o in outs]
        check_greedy_close(refs, got[: len(prompts)][::-1], f"smollm2/{scenario}/reversed")
        got = got[len(prompts) :]
        assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    else:
        got = [o.outputs[0].token_ids for o in llm.generate(reqs, params, use_tqdm=False)]
    if scenario == "preemption":
        assert llm.llm_engine.get_stats().num_preemptions > 0
    rate = check_greedy_close(refs, got, f"smollm2/{scenario}")
    assert rate >= 0.75
    assert_engine_idle_and_empty(llm)


def test_default_model_text_generation():
    """LLM() with no model loads SmolLM2 and answers a factual prompt sensibly, ending on EOS or length."""
    llm = LLM(kv_cache_memory=64 << 20)
    out = llm.generate(
        "The capital of France is", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")
    assert torch.is_tensor(torch.tensor(out.prompt_token_ids))
