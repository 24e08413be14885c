"""``LLM.generate`` end to end on a tiny Llama: inputs, outputs, sampling features, errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

from distgen import LLM, SamplingParams, StructuredOutputsParams
from tests.conftest import assert_engine_idle_and_empty, check_greedy_close, random_prompts

KV = 16 << 20


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", kv_cache_memory=KV)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import transformers as tf

    return tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


PROMPTS = random_prompts(6, seed=7, lo=4, hi=30)
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tok_prompts(prompts=PROMPTS):
    return [{"prompt_token_ids": p} for p in prompts]


def test_input_forms_and_order(llm):
    tok = llm.get_tokenizer()
    texts = ["Hello, my name is", "The capital of France is", "a"]
    by_text = llm.generate(texts, GREEDY, use_tqdm=False)
    assert [o.prompt for o in by_text] == texts
    assert [o.request_id for o in by_text] == sorted({o.request_id for o in by_text}, key=int)
    single = llm.generate(texts[1], GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == by_text[1].outputs[0].token_ids
    ids = tok(texts[0]).input_ids
    as_ids = llm.generate({"prompt_token_ids": ids}, GREEDY, use_tqdm=False)[0]
    assert as_ids.prompt_token_ids == ids and as_ids.outputs[0].token_ids == by_text[0].outputs[0].token_ids
    # Token ids as a tokenizer's arrays (return_tensors="np" / "pt") are the same prompt.
    for arr in (np.array(ids), torch.tensor(ids)):
        out = llm.generate({"prompt_token_ids": arr}, GREEDY, use_tqdm=False)[0]
        assert out.prompt_token_ids == ids and out.outputs[0].token_ids == as_ids.outputs[0].token_ids
    with pytest.raises(TypeError, match=r"prompt_token_ids must be integers, got 1.5"):
        llm.generate({"prompt_token_ids": [1, 1.5]}, GREEDY, use_tqdm=False)
    # The bare-list form goes through the same check (True was sent on and the engine core aborted it).
    with pytest.raises(TypeError, match=r"prompt_token_ids must be integers, got True \(bool\)"):
        llm.generate([True, 5], GREEDY, use_tqdm=False)
    # One SamplingParams per prompt.
    outs = llm.generate(texts, [GREEDY, SamplingParams(temperature=0, max_tokens=3), GREEDY], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12, 3, 12]
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)
    with pytest.raises(ValueError, match="SamplingParams for 3 prompts"):
        llm.generate(texts, [GREEDY, GREEDY], use_tqdm=False)


def test_text_is_the_detokenized_tokens(llm):
    tok = llm.get_tokenizer()
    out = llm.generate(tok_prompts(), GREEDY, use_tqdm=False)
    for o in out:
        c = o.outputs[0]
        assert c.text == tok.decode(c.token_ids, skip_special_tokens=True)
        assert o.metrics.arrival_time <= o.metrics.first_token_time <= o.metrics.finished_time


def test_seeded_sampling_is_reproducible_across_batches(llm):
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=1234, ignore_eos=True)
    alone = llm.generate(tok_prompts(PROMPTS[:1]), p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=0.7, max_tokens=14, ignore_eos=True)
    mixed = llm.generate(
        tok_prompts(PROMPTS[1:4]) + tok_prompts(PROMPTS[:1]), [others] * 3 + [p], use_tqdm=False
    )
    assert mixed[-1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=99, ignore_eos=True)
    assert llm.generate(tok_prompts(PROMPTS[:1]), other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_samples(llm):
    p = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=5, ignore_eos=True)
    (out,) = llm.generate(tok_prompts(PROMPTS[:1]), p, use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 6 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    greedy = llm.generate(
        tok_prompts(PROMPTS[:1]), SamplingParams(n=2, temperature=0, max_tokens=6), use_tqdm=False
    )[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_stop_string_ends_output_where_it_occurs(llm):
    base = llm.generate(
        tok_prompts(PROMPTS[:1]),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
        use_tqdm=False,
    )[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), f"pick a visible stop string from {text!r}"
    cut = text.index(stop)
    out = llm.generate(
        tok_prompts(PROMPTS[:1]), SamplingParams(temperature=0, max_tokens=20, stop=[stop]), use_tqdm=False
    )[0].outputs[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate(
        tok_prompts(PROMPTS[:1]),
        SamplingParams(temperature=0, max_tokens=20, stop=[stop], include_stop_str_in_output=True),
        use_tqdm=False,
    )[0].outputs[0]
    assert inc.text == text[: cut + len(stop)]
    # The token that completed the stop string is the last one returned.
    assert inc.token_ids == base.token_ids[: len(inc.token_ids)]


def test_stop_token_ids(llm):
    base = llm.generate(tok_prompts(PROMPTS[:1]), GREEDY, use_tqdm=False)[0].outputs[0]
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate(
        tok_prompts(PROMPTS[:1]),
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
        use_tqdm=False,
    )[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    tok = llm.get_tokenizer()
    assert out.text == tok.decode(base.token_ids[:first], skip_special_tokens=True)


def test_logprobs_match_transformers(llm, hf_model):
    prompt = PROMPTS[2]
    out = llm.generate(
        tok_prompts([prompt]),
        SamplingParams(temperature=0, max_tokens=5, logprobs=3, prompt_logprobs=2, ignore_eos=True),
        use_tqdm=False,
    )[0]
    c = out.outputs[0]
    full = torch.tensor([prompt + c.token_ids[:-1]])
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(full).logits[0].float(), -1)
    n = len(prompt)
    assert len(c.logprobs) == 5
    total = 0.0
    for j, (tid, d) in enumerate(zip(c.token_ids, c.logprobs)):
        assert tid in d and d[tid].rank == 1 and 3 <= len(d) <= 4
        assert math.isclose(d[tid].logprob, ref[n - 1 + j, tid].item(), abs_tol=1e-4)
        top = ref[n - 1 + j].topk(3).indices.tolist()
        assert set(top) <= set(d)
        total += d[tid].logprob
    assert math.isclose(c.cumulative_logprob, total, abs_tol=1e-4)
    plp = out.prompt_logprobs
    assert len(plp) == n and plp[0] is None
    for p in range(1, n):
        actual = prompt[p]
        assert actual in plp[p]
        assert math.isclose(plp[p][actual].logprob, ref[p - 1, actual].item(), abs_tol=1e-4)
        assert plp[p][actual].rank == int((ref[p - 1] > ref[p - 1, actual]).sum()) + 1


def test_repetition_penalty_matches_transformers(llm, hf_model):
    """Greedy under a repetition penalty, the six prompts decoding together for 16 steps (the runner
    reuses one sampling metadata while the batch is unchanged; the penalty must still see each new
    token), against transformers' ``RepetitionPenaltyLogitsProcessor`` (the same rule over prompt and
    output tokens), one prompt at a time."""
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.8)
    outs = llm.generate(tok_prompts(), params, use_tqdm=False)
    refs = []
    for p in PROMPTS:
        ids = torch.tensor([p])
        with torch.inference_mode():
            g = hf_model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=16,
                min_new_tokens=16,
                do_sample=False,
                repetition_penalty=1.8,
                output_scores=True,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        refs.append((g.sequences[0, len(p) :].tolist(), [s[0].topk(5).indices.tolist() for s in g.scores]))
    penalized = [o.outputs[0].token_ids for o in outs]
    plain = [o.outputs[0].token_ids for o in llm.generate(tok_prompts(), GREEDY, use_tqdm=False)]
    assert any(a[:12] != b for a, b in zip(penalized, plain)), "the penalty changed nothing"
    check_greedy_close(refs, penalized, "repetition penalty")


def test_logprobs_past_the_vocabulary_are_refused_whatever_max_logprobs(model_dir):
    """An engine started with max_logprobs above the vocabulary let a request ask for more logprobs
    than there are tokens, and its sampler's top-k took the engine core down."""
    llm = LLM(model_dir, kv_cache_memory=KV, max_logprobs=10**6)
    try:
        vocab = llm.llm_engine.config.model.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            params = SamplingParams(max_tokens=1, **{name: vocab + 1})
            with pytest.raises(ValueError, match=rf"{name}={vocab + 1} is more than the vocabulary holds"):
                llm.generate({"prompt_token_ids": [5, 6]}, params, use_tqdm=False)
        out = llm.generate(
            {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=1, logprobs=vocab), use_tqdm=False
        )
        assert len(out[0].outputs[0].logprobs[0]) == vocab
    finally:
        llm.shutdown()


def test_bad_requests_are_rejected_and_engine_keeps_serving(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt has 2000 tokens.*maximum model length is 1024"):
        llm.generate({"prompt_token_ids": [5] * 2000}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        llm.generate({"prompt_token_ids": [5, 10**7]}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"not valid Unicode text: '\\ud800' at character 3"):
        llm.generate("Hi \ud800", GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="not valid Unicode"):
        llm.chat([{"role": "user", "content": "\udfff"}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match=r"prompt_logprobs=21 is more than this engine allows \(20\)"):
        llm.generate(
            tok_prompts(PROMPTS[:1]), SamplingParams(max_tokens=2, prompt_logprobs=21), use_tqdm=False
        )
    with pytest.raises(TypeError, match="prompts must be a string, a token-id list"):
        llm.generate(None, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="a prompt dict's 'prompt' must be a string, got NoneType"):
        llm.generate({"prompt": None}, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="a prompt dict's 'prompt' must be a string, got int"):
        llm.generate({"prompt": 5, "prompt_token_ids": [5]}, GREEDY, use_tqdm=False)
    with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list of them"):
        llm.generate("hi", {"max_tokens": 2}, use_tqdm=False)
    # Parameters changed after construction are checked when the request is made, not found bad by
    # the engine core's decoder (which ended the request as aborted).
    edited = SamplingParams(max_tokens=2)
    edited.temperature = -1
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        llm.generate("Hi", edited, use_tqdm=False)
    # More sequences than DISTGEN_MAX_N_SEQUENCES (16384 by default, as vLLM's limit).
    with pytest.raises(ValueError, match=r"SamplingParams.n=16385 is more than this engine allows \(16384\)"):
        llm.generate("Hi", SamplingParams(n=16385, max_tokens=1), use_tqdm=False)
    # A priority the default (fcfs) policy would ignore, and a malformed one.
    with pytest.raises(ValueError, match=r"priority=1 needs the priority scheduling policy.*'fcfs'"):
        llm.generate(tok_prompts(PROMPTS[:2]), GREEDY, use_tqdm=False, priority=[0, 1])
    with pytest.raises(ValueError, match="one integer per prompt"):
        llm.generate(tok_prompts(PROMPTS[:2]), GREEDY, use_tqdm=False, priority=[0])
    # n children are seeded seed + i, wrapped into 64 bits: the largest seed must not overflow them
    # (a child seed out of range used to fail the engine core's decoding and kill the engine).
    wide = SamplingParams(n=2, seed=2**63 - 1, temperature=1.0, max_tokens=2)
    (both,) = llm.generate(tok_prompts(PROMPTS[:1]), wide, use_tqdm=False)
    assert len(both.outputs) == 2 and all(len(c.token_ids) == 2 for c in both.outputs)
    out = llm.generate(tok_prompts(PROMPTS[:2]), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in out)
    assert_engine_idle_and_empty(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_are_reported_once_across_preemptions(llm, model_dir, async_scheduling):
    """A preempted request recomputes its prefill, which scores the prompt again: those positions
    must not be reported twice (they were: 38 prompt tokens came back with 75 entries)."""
    prompts = [{"prompt_token_ids": p} for p in random_prompts(8, seed=3, lo=20, hi=40)]
    params = SamplingParams(temperature=0, max_tokens=30, prompt_logprobs=1, ignore_eos=True)
    want = llm.generate(prompts, params, use_tqdm=False)
    small = LLM(
        model_dir,
        dtype="float32",
        num_gpu_blocks_override=40,
        block_size=4,
        max_num_batched_tokens=64,
        async_scheduling=async_scheduling,
    )
    try:
        got = small.generate(prompts, params, use_tqdm=False)
        assert small.llm_engine.get_stats().num_preemptions > 0
    finally:
        small.shutdown()
    for w, g in zip(want, got):
        assert len(g.prompt_logprobs) == len(g.prompt_token_ids)
        for pos, (dw, dg) in enumerate(zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:]), 1):
            t = g.prompt_token_ids[pos]
            assert math.isclose(dw[t].logprob, dg[t].logprob, abs_tol=1e-4), pos


def test_logit_bias_and_allowed_token_ids(llm):
    prompts = tok_prompts(PROMPTS[:2])
    pushed = SamplingParams(temperature=0, max_tokens=6, logit_bias={123: 100.0}, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, pushed, use_tqdm=False)] == [[123] * 6] * 2
    allowed = [7, 300, 4000]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=12, allowed_token_ids=allowed)
    outs = llm.generate(prompts, sampled, use_tqdm=False)
    assert all(set(o.outputs[0].token_ids) <= set(allowed) for o in outs)
    vocab = llm.llm_engine.config.model.vocab_size
    with pytest.raises(ValueError, match=f"logit_bias holds token id {vocab}"):
        llm.generate(prompts, SamplingParams(logit_bias={vocab: 1.0}), use_tqdm=False)
    assert_engine_idle_and_empty(llm)


def test_unsupported_architecture(tmp_path, model_dir):
    d = tmp_path / "gpt2ish"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*supported architectures: .*LlamaForCausalLM"):
        LLM(str(d), kv_cache_memory=KV)


def test_missing_model_path():
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM("/nonexistent/model", kv_cache_memory=KV)


def test_generation_config_defaults(tmp_path, model_dir):
    d = tmp_path / "with-genconfig"
    shutil.copytree(model_dir, d)
    (d / "generation_config.json").write_text(
        json.dumps(
            {"temperature": 0.25, "top_k": 7, "top_p": 0.5, "repetition_penalty": 1.1, "max_new_tokens": 5}
        )
    )
    llm = LLM(str(d), kv_cache_memory=KV)
    p = llm.get_default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.max_tokens) == (0.25, 7, 0.5, 1.1, 5)
    out = llm.generate(tok_prompts(PROMPTS[:1]), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 5
    for off in ("distgen", "vllm"):
        llm2 = LLM(str(d), kv_cache_memory=KV, generation_config=off)
        assert llm2.get_default_sampling_params() == SamplingParams()
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    llm3 = LLM(str(d), kv_cache_memory=KV, generation_config=str(other))
    assert llm3.get_default_sampling_params().max_tokens == 3


def test_sharded_safetensors_with_index(tmp_path, model_dir, llm):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="2MB")
    for f in os.listdir(model_dir):
        if f.startswith("tokenizer") or f.endswith(".jinja") or f == "special_tokens_map.json":
            shutil.copy(os.path.join(model_dir, f), d)
    assert (d / "model.safetensors.index.json").exists()
    assert len(list(d.glob("*.safetensors"))) > 1
    sharded = LLM(str(d), kv_cache_memory=KV)
    a = [o.outputs[0].token_ids for o in sharded.generate(tok_prompts(), GREEDY, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in llm.generate(tok_prompts(), GREEDY, use_tqdm=False)]
    assert a == b


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = random_prompts(1, seed=3, lo=40, hi=40)[0]
    before = llm.llm_engine.get_stats().prefix_cache_hits
    p = SamplingParams(n=3, temperature=1.0, max_tokens=4, seed=1, ignore_eos=True)
    llm.generate({"prompt_token_ids": prompt}, p, use_tqdm=False)
    bs = llm.llm_engine.config.cache.block_size
    # The second and third samples reuse the first one's full prompt blocks.
    assert llm.llm_engine.get_stats().prefix_cache_hits - before >= 2 * ((len(prompt) - 1) // bs) * bs
    assert_engine_idle_and_empty(llm)


def _occurs(seq: list[int], tokens: list[int]) -> bool:
    return any(tokens[i : i + len(seq)] == seq for i in range(len(tokens) - len(seq) + 1))


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_words_are_never_generated(model_dir, async_scheduling):
    """A two-token word taken from the greedy output is steered around exactly where it began; with
    async scheduling the step after its first token must see that token on the host."""
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=KV, async_scheduling=async_scheduling)
    try:
        tok, ip = llm.get_tokenizer(), llm.llm_engine.input_processor
        greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
        prompt = {"prompt_token_ids": PROMPTS[1]}
        free = llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids
        # The first two-token word in the output whose spellings occur nowhere before it.
        for i in range(len(free) - 1):
            word = tok.decode(free[i : i + 2])
            seqs = ip.bad_words_token_ids([word])
            if free[i : i + 2] in seqs and not any(_occurs(s, free[: i + 1]) for s in seqs):
                break
        else:
            pytest.fail(f"no two-token word to forbid in {free}")
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[word])
        got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert got[: i + 1] == free[: i + 1] and got[i + 1] != free[i + 1], (word, free, got)
        assert not any(_occurs(s, got) for s in seqs), (word, seqs, got)
        # A one-token word is forbidden everywhere.
        single = tok.decode([free[0]])
        params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, bad_words=[single])
        got = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert all(not _occurs(s, got) for s in ip.bad_words_token_ids([single]))
        assert got[0] != free[0]
        assert_engine_idle_and_empty(llm)
    finally:
        llm.shutdown()


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    long = PROMPTS[1]
    k = 5
    params = dict(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    cut = llm.generate(long, SamplingParams(**params, truncate_prompt_tokens=k), use_tqdm=False)
    want = llm.generate(long[-k:], SamplingParams(**params), use_tqdm=False)
    assert cut[0].prompt_token_ids == long[-k:]
    assert cut[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert len(cut[0].prompt_logprobs) == k
    # A text prompt's text becomes that of the tokens kept; a short prompt is left whole.
    tok = llm.get_tokenizer()
    text = "one two three four five six seven eight nine ten"
    out = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=3), use_tqdm=False)[0]
    assert out.prompt_token_ids == tok(text).input_ids[-3:]
    assert out.prompt == tok.decode(out.prompt_token_ids) and out.prompt.endswith("ten")
    short = llm.generate(text, SamplingParams(max_tokens=1, truncate_prompt_tokens=1000), use_tqdm=False)[0]
    assert short.prompt == text and short.prompt_token_ids == tok(text).input_ids
    # -1: as many as fit with room for one generated token.
    limit = llm.llm_engine.max_model_len
    prompt = random_prompts(1, seed=3, lo=limit + 5, hi=limit + 6)[0]
    fit = llm.generate(prompt, SamplingParams(max_tokens=1, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert fit.prompt_token_ids == prompt[-(limit - 1) :] and len(fit.outputs[0].token_ids) == 1
    assert_engine_idle_and_empty(llm)


def test_structured_outputs_hold_whatever_the_model_writes(llm):
    """A tiny random model writes nothing sensible, yet each output fits its constraint and ends on it."""
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": -5, "maximum": 999},
            "ok": {"type": "boolean"},
            "c": {"enum": ["red", "green"]},
        },
        "required": ["n", "ok", "c"],
        "additionalProperties": False,
    }
    specs = [
        StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"),
        StructuredOutputsParams(choice=["alpha", "beta gamma"]),
        StructuredOutputsParams(json=schema, disable_any_whitespace=True),
        StructuredOutputsParams(grammar='root ::= "yes" | "no" | "maybe"'),
    ]
    compiled_before = llm.llm_engine.input_processor._compiled.cache_info().misses
    for seed in range(2):
        params = [
            SamplingParams(temperature=t, seed=seed, max_tokens=64, structured_outputs=spec)
            for spec in specs
            for t in (0.0, 1.0)
        ]
        outs = llm.generate(random_prompts(len(params), seed=seed), params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
        regex, choice, obj, grammar = (texts[i : i + 2] for i in range(0, 8, 2))
        assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) for t in regex), regex
        assert set(choice) <= {"alpha", "beta gamma"} and set(grammar) <= {"yes", "no", "maybe"}
        for t in obj:
            value = json.loads(t)
            assert type(value["n"]) is int and -5 <= value["n"] <= 999
            assert isinstance(value["ok"], bool) and value["c"] in {"red", "green"}
            assert set(value) == {"n", "ok", "c"}
    # Each distinct constraint was compiled once (4 specs, each used by 4 requests).
    assert llm.llm_engine.input_processor._compiled.cache_info().misses - compiled_before == 4
    # A grammar that can only end wins over min_tokens (blocking EOS would leave nothing to sample).
    ended = SamplingParams(temperature=0, min_tokens=10, structured_outputs={"choice": ["alpha"]})
    out = llm.generate(PROMPTS[0], ended, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("alpha", "stop")
    # With _grammar_after (set by a server with a reasoning parser), the output is free until those
    # tokens, then held: here, the greedy output's own first two tokens stand for "</think>".
    free = llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    free = free.outputs[0].token_ids
    tok = llm.get_tokenizer()
    assert not re.fullmatch("[0-9]+", tok.decode(free[:1]))  # the grammar would not have allowed it
    later = SamplingParams(temperature=0, max_tokens=16, structured_outputs={"regex": "[0-9]{3}"})
    later._grammar_after = free[:2]
    got = llm.generate(PROMPTS[1], later, use_tqdm=False)[0].outputs[0]
    assert got.token_ids[:2] == free[:2] and got.finish_reason == "stop"
    assert re.fullmatch("[0-9]{3}", tok.decode(got.token_ids[2:], skip_special_tokens=True))
    with pytest.raises(ValueError, match="structured_outputs.regex does not compile"):
        llm.generate("x", SamplingParams(structured_outputs={"regex": "[a-"}), use_tqdm=False)
    assert_engine_idle_and_empty(llm)


def test_priority_scheduling_runs_the_most_urgent_first(model_dir):
    """One sequence at a time: a first request (the most urgent) runs while the others queue; they
    then start in priority order, not in the order given."""
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=KV, max_num_seqs=1, scheduling_policy="priority")
    try:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (24, 2, 2, 2, 2)]
        outs = llm.generate(tok_prompts(PROMPTS[:5]), params, use_tqdm=False, priority=[-5, 3, 1, 2, 1])
        started = sorted(range(5), key=lambda i: outs[i].metrics.first_token_time)
        assert started == [0, 2, 4, 3, 1]  # equal priorities (2 and 4) in the order given
        assert [len(o.outputs[0].token_ids) for o in outs] == [24, 2, 2, 2, 2]
        assert_engine_idle_and_empty(llm)
    finally:
        llm.shutdown()


def test_a_reasoning_parser_leaves_the_thinking_free(model_dir):
    """As vLLM's ``reasoning_parser``: a constraint holds only once the model has closed its think
    block. The tiny model never writes ``</think>``, so its greedy reply is what it writes with no
    constraint at all; a prompt that closes the block itself is constrained from the first token."""
    llm = LLM(model_dir, dtype="float32", kv_cache_memory=KV, reasoning_parser="qwen3")
    try:
        free = SamplingParams(temperature=0, max_tokens=12)
        held = SamplingParams(temperature=0, max_tokens=12, structured_outputs={"choice": ["alpha", "beta"]})
        closed = "Answer now. <think>\n\n</think>\n\n"
        closed_ids = llm.get_tokenizer().encode(closed)
        want = llm.generate("Think first.", free, use_tqdm=False)[0].outputs[0].token_ids
        outs = llm.generate(["Think first.", closed, {"prompt_token_ids": closed_ids}], held, use_tqdm=False)
        assert outs[0].outputs[0].token_ids == want
        for out in outs[1:]:
            assert out.outputs[0].text in {"alpha", "beta"} and out.outputs[0].finish_reason == "stop"
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'; there are: qwen3, deepseek_r1"):
        LLM(model_dir, reasoning_parser="r2")
