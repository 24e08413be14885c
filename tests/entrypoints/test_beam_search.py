"""``LLM.beam_search`` against transformers' beam search on a tiny Llama.

The two algorithms coincide when no beam finishes on EOS (``ignore_eos=True`` here, and an EOS id
that never enters the candidates in transformers): both keep the ``beam_width`` highest cumulative
logprobs each step, and since every final beam then has the same length, ``length_penalty`` divides
all scores by the same number and cannot change the order.
"""

from __future__ import annotations

import copy

import pytest
import torch

from distgen import LLM
from distgen.sampling_params import BeamSearchParams
from tests.conftest import assert_engine_idle_and_empty, random_prompts

UNUSED_EOS = 49151
PROMPTS = random_prompts(3, seed=11, lo=5, hi=20)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, kv_cache_memory=16 << 20, block_size=4)


def hf_beams(model_dir, prompt, width, max_new, length_penalty):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = copy.deepcopy(model.generation_config)
    cfg.eos_token_id = UNUSED_EOS
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            generation_config=cfg,
            num_beams=width,
            num_return_sequences=width,
            max_new_tokens=max_new,
            do_sample=False,
            early_stopping=True,
            length_penalty=length_penalty,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
    scores = out.sequences_scores.tolist() if width > 1 else None  # width 1 is plain greedy in HF
    return [s[len(prompt) :].tolist() for s in out.sequences], scores


# 12: each step asks for 24 logprobs, more than the engine's max_logprobs (20) lets a user request.
@pytest.mark.parametrize("width", [1, 2, 5, 12])
@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_best_beam_matches_transformers(llm, model_dir, width, length_penalty):
    params = BeamSearchParams(beam_width=width, max_tokens=8, ignore_eos=True, length_penalty=length_penalty)
    outs = llm.beam_search([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, out in zip(PROMPTS, outs):
        seqs, scores = hf_beams(model_dir, prompt, width, 8, length_penalty)
        assert all(UNUSED_EOS not in s for s in seqs)
        ours = [s.tokens[len(prompt) :] for s in out.sequences]
        assert len(ours) == width
        assert ours[0] == seqs[0]
        assert ours == seqs  # the whole beam, in order
        if scores is not None:
            ours_scores = [s.cum_logprob / 8**length_penalty for s in out.sequences]
            assert ours_scores == pytest.approx(scores, abs=1e-4)
    assert_engine_idle_and_empty(llm)


def test_beams_share_prefix_blocks_and_eos_ends_beams(llm):
    tok = llm.get_tokenizer()
    hits = llm.llm_engine.get_stats().prefix_cache_hits
    (out,) = llm.beam_search(["Hello, my name is "], BeamSearchParams(beam_width=3, max_tokens=12))
    assert llm.llm_engine.get_stats().prefix_cache_hits > hits  # later steps reuse earlier blocks
    assert_engine_idle_and_empty(llm)
    seqs = out.sequences
    assert 1 <= len(seqs) <= 3
    assert all(s.text.startswith("Hello, my name is") for s in seqs)
    for s in seqs:
        gen = s.tokens[len(tok("Hello, my name is ").input_ids) :]
        assert 2 not in gen[:-1]  # EOS can only be last
        assert s.finish_reason in ("stop", "length")


def test_prompts_that_cannot_run_are_rejected(llm):
    limit = llm.llm_engine.max_model_len
    with pytest.raises(
        ValueError, match=f"the prompt has {limit} tokens, but the maximum model length is {limit}"
    ):
        llm.beam_search([{"prompt_token_ids": [5] * limit}], BeamSearchParams(beam_width=2, max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.beam_search([{"prompt_token_ids": []}], BeamSearchParams(beam_width=2, max_tokens=2))
    # Each step asks for 2 * beam_width logprobs: more than the vocabulary crashed the engine core.
    vocab = llm.llm_engine.config.model.vocab_size
    with pytest.raises(ValueError, match=rf"beam_width={vocab // 2 + 1} is more than half the vocabulary"):
        llm.beam_search(
            [{"prompt_token_ids": [5]}], BeamSearchParams(beam_width=vocab // 2 + 1, max_tokens=1)
        )
    assert_engine_idle_and_empty(llm)
    assert (
        len(llm.beam_search([{"prompt_token_ids": [5]}], BeamSearchParams(beam_width=2, max_tokens=1))) == 1
    )
