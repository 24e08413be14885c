"""SamplingMetadata from each row's SamplingSpec: what is left None, what is blocked, what is sparse."""

from __future__ import annotations

import math

import pytest
import torch

from distgen.layers.sampling_metadata import bad_word_ends, build_sampling_metadata
from distgen.sampling_params import SamplingParams
from distgen.sampling_spec import SamplingSpec


def _spec(eos_token_ids=None, bad_words_token_ids=None, **params) -> SamplingSpec:
    """A request's spec as the input processor makes it: from checked params (greedy resets its knobs)."""
    return SamplingSpec.from_params(SamplingParams(**params), eos_token_ids, bad_words_token_ids)


def test_build_metadata_fields():
    vocab = 50
    params = [
        _spec(temperature=0.0, top_k=5, top_p=0.5),  # greedy: knobs reset
        _spec(temperature=0.7, top_k=-1, logprobs=2),
        _spec(temperature=1.0, top_k=0, logprobs=5, repetition_penalty=1.2),
    ]
    meta = build_sampling_metadata(params, [[1, 2], [3], [4, 5, 6]], [[], [7], []], {}, vocab)
    torch.testing.assert_close(meta.temperature, torch.tensor([0.0, 0.7, 1.0]))
    assert not meta.all_greedy and not meta.all_random
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.max_num_logprobs == 5
    assert not meta.no_penalties and meta.frequency_penalties is None and meta.presence_penalties is None
    torch.testing.assert_close(meta.repetition_penalties, torch.tensor([1.0, 1.0, 1.2]))
    assert meta.prompt_token_ids.tolist() == [[1, 2, vocab], [3, vocab, vocab], [4, 5, 6]]

    params = [_spec(top_k=3, min_p=0.1), _spec(top_p=0.9)]
    meta = build_sampling_metadata(params, [[1], [2]], [[], []], {}, vocab)
    assert meta.all_random and meta.no_penalties and meta.prompt_token_ids is None
    assert meta.top_k.tolist() == [3, vocab]
    torch.testing.assert_close(meta.top_p, torch.tensor([1.0, 0.9]))
    torch.testing.assert_close(meta.min_p, torch.tensor([0.1, 0.0]))
    assert meta.max_num_logprobs is None
    assert math.isclose(float(meta.temperature[0]), 1.0)


def test_build_metadata_min_tokens():
    # 99 is outside the vocabulary and must be dropped
    p = _spec(temperature=0.0, min_tokens=2, stop_token_ids=[5], max_tokens=8, eos_token_ids=[3, 99])
    q = _spec(temperature=0.0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)
    meta = build_sampling_metadata([p, p, q], [[1], [1], [1]], [[4], [4, 4], []], {}, vocab_size=10)
    assert meta.blocked == {0: {3, 5}, 2: {5}}


def test_bad_word_ends_follow_the_output():
    words = [[7], [3, 4], [1, 2, 5], [9, 9]]
    assert bad_word_ends(words, []) == {7}  # a one-token word is always forbidden
    assert bad_word_ends(words, [8, 3]) == {7, 4}
    assert bad_word_ends(words, [1, 2]) == {7, 5}
    assert bad_word_ends(words, [2]) == {7}  # [1, 2, 5] needs both of its first tokens
    assert bad_word_ends(words, [9]) == {7, 9}


def test_bad_words_and_min_tokens_block_together():
    # 40 is outside the vocabulary: dropped
    p = _spec(temperature=0.0, min_tokens=3, stop_token_ids=[5], bad_words_token_ids=[[6], [2, 8], [2, 40]])
    q = _spec(bad_words_token_ids=[[4, 1]])
    meta = build_sampling_metadata([p, q, q], [[1]] * 3, [[2], [4], [1, 4, 3]], {}, vocab_size=10)
    assert meta.blocked == {0: {5, 6, 8}, 1: {1}}


def test_allowed_ids_and_logit_bias_become_index_tensors():
    vocab = 40
    params = [
        _spec(allowed_token_ids=[3, 5]),
        _spec(),
        _spec(logit_bias={7: 2.5, 9: -1.0}, allowed_token_ids=[7]),
    ]
    meta = build_sampling_metadata(params, [[1]] * 3, [[], [], []], {}, vocab)
    allowed, bias = meta.allowed, meta.logit_bias
    assert allowed.rows.tolist() == [0, 2]
    assert allowed.pair_rows.tolist() == [0, 0, 2] and allowed.pair_ids.tolist() == [3, 5, 7]
    assert bias.rows.tolist() == [2, 2] and bias.token_ids.tolist() == [7, 9]
    assert bias.values.tolist() == [2.5, -1.0]
    plain = build_sampling_metadata([_spec()], [[1]], [[]], {}, vocab)
    assert plain.allowed is None and plain.logit_bias is None


def test_token_ids_beyond_the_vocabulary_are_refused():
    SamplingParams(logit_bias={9: 1.0}, allowed_token_ids=[0, 9]).verify_token_ids(10)
    with pytest.raises(ValueError, match=r"logit_bias holds token id 10, out of the vocabulary range"):
        SamplingParams(logit_bias={10: 1.0}).verify_token_ids(10)
    with pytest.raises(ValueError, match="allowed_token_ids holds token id 12"):
        SamplingParams(allowed_token_ids=[1, 12]).verify_token_ids(10)
