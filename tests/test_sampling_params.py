"""SamplingParams / BeamSearchParams: validation names the field, greedy resets knobs, stop normalisation."""

from __future__ import annotations

import re

import msgspec
import numpy as np
import pytest

from distgen.sampling_params import BeamSearchParams, SamplingParams
from distgen.sampling_spec import SamplingSpec

INVALID = [
    ("n", {"n": 0}),
    ("n", {"n": 1.5}),
    ("presence_penalty", {"presence_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": "0.1"}),
    ("frequency_penalty", {"frequency_penalty": -2.01}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": -1.0}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": float("nan")}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.01}),
    ("top_k", {"top_k": -2}),
    ("top_k", {"top_k": 2.5}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.5}),
    ("seed", {"seed": "7"}),
    ("seed", {"seed": 2**63}),  # would not even cross to the engine core (msgpack ints are 64-bit)
    ("seed", {"seed": -(2**63) - 1}),
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": 3.0}),
    ("min_tokens", {"min_tokens": -1}),
    ("min_tokens", {"min_tokens": 10, "max_tokens": 5}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": -3}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["ok", 3]}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("stop_token_ids", {"stop_token_ids": ["2"]}),
    ("logit_bias", {"logit_bias": {-1: 1.0}}),
    ("logit_bias", {"logit_bias": {"5": 1.0}}),
    ("logit_bias", {"logit_bias": {5: float("inf")}}),
    ("logit_bias", {"logit_bias": [5]}),
    ("allowed_token_ids", {"allowed_token_ids": []}),
    ("allowed_token_ids", {"allowed_token_ids": [3, -1]}),
    ("allowed_token_ids", {"allowed_token_ids": 3}),
    # Two masks that could leave no token to sample: the grammar has to hold the restriction.
    ("allowed_token_ids", {"allowed_token_ids": [3], "structured_outputs": {"choice": ["a", "b"]}}),
    ("bad_words", {"bad_words": [""]}),
    ("bad_words", {"bad_words": ["ok", "  "]}),
    ("bad_words", {"bad_words": [5]}),
    ("bad_words", {"bad_words": 5}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": 0}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": -2}),
    ("truncate_prompt_tokens", {"truncate_prompt_tokens": 1.5}),
    # Wrong types get a message naming the field too, not a TypeError from deep inside.
    ("stop", {"stop": 5}),
    ("stop_token_ids", {"stop_token_ids": 5}),
    ("stop_token_ids", {"stop_token_ids": [True]}),
    ("temperature", {"temperature": "0.5"}),
    ("top_p", {"top_p": None}),
    ("n", {"n": True}),
    ("max_tokens", {"max_tokens": "16"}),
    ("logprobs", {"logprobs": 1.0}),
    # A flag that is not a bool passed here and was refused by the engine core's decoder instead.
    ("ignore_eos", {"ignore_eos": 1}),
    ("skip_special_tokens", {"skip_special_tokens": "no"}),
    ("detokenize", {"detokenize": None}),
    ("include_stop_str_in_output", {"include_stop_str_in_output": [True]}),
]


@pytest.mark.parametrize(
    "name, value, says",
    [("temperature", "0.5", "must be a number"), ("n", True, "must be an integer"), ("stop", 5, "a string")],
)
def test_a_wrong_type_says_so(name, value, says):
    """Not a range message: "must be >= 0, got '0.5'" would send the user looking at the value."""
    with pytest.raises(ValueError, match=says):
        SamplingParams(**{name: value})


@pytest.mark.parametrize("name, kwargs", INVALID, ids=[f"{n}-{i}" for i, (n, _) in enumerate(INVALID)])
def test_invalid_field_raises_naming_it(name, kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    message = str(err.value)
    assert re.search(rf"\b{re.escape(name)}\b", message), message
    # The first field the message names is the offending one (min_tokens may mention max_tokens after).
    named = re.findall(r"SamplingParams\.(\w+)", message)
    assert named and named[0] == name, message


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": -1},
        {"top_k": 0},
        {"top_k": 1},
        {"top_p": 1.0},
        {"min_p": 0.0},
        {"min_p": 1.0},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"temperature": 0.0},
        {"max_tokens": None, "min_tokens": 100},
        {"max_tokens": 5, "min_tokens": 5},
        {"logprobs": 0, "prompt_logprobs": 0},
        {"seed": 0},
        {"seed": 2**63 - 1},
        {"seed": -(2**63)},
        {"truncate_prompt_tokens": 1},
        {"truncate_prompt_tokens": -1},
        {"bad_words": []},
    ],
)
def test_boundary_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_greedy_resets_truncation_knobs():
    p = SamplingParams(temperature=0.0, top_p=0.5, top_k=7, min_p=0.3)
    assert p.is_greedy
    assert (p.top_p, p.top_k, p.min_p) == (1.0, 0, 0.0)
    q = SamplingParams(temperature=0.8, top_p=0.5, top_k=7, min_p=0.3)
    assert not q.is_greedy
    assert (q.top_p, q.top_k, q.min_p) == (0.5, 7, 0.3)


def test_numpy_numbers_become_plain_ones():
    """Values computed with numpy are numbers a user means; they must also cross to the engine core
    (msgpack knows no numpy scalars)."""
    p = SamplingParams(
        max_tokens=np.int64(5), temperature=np.float32(0.5), top_k=np.int32(3), stop_token_ids=[np.int64(7)]
    )
    assert (p.max_tokens, p.temperature, p.top_k, p.stop_token_ids) == (5, 0.5, 3, [7])
    assert type(p.max_tokens) is int and type(p.temperature) is float and type(p.stop_token_ids[0]) is int
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(p), type=SamplingParams) == p
    b = BeamSearchParams(beam_width=np.int64(2), max_tokens=np.int64(4), temperature=np.float64(0.0))
    assert type(b.beam_width) is int and type(b.max_tokens) is int
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        SamplingParams(max_tokens=np.float64(5.0))


def test_stop_normalised_to_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams().stop == []
    assert SamplingParams(stop_token_ids=(4, 5)).stop_token_ids == [4, 5]
    assert SamplingParams().stop_token_ids == []


def test_bad_words_normalised_and_prompt_limit():
    assert SamplingParams(bad_words="darn").bad_words == ["darn"]
    assert SamplingParams(bad_words=("a", "b")).bad_words == ["a", "b"]
    assert SamplingParams(truncate_prompt_tokens=5).prompt_limit(100) == 5
    assert SamplingParams(truncate_prompt_tokens=-1).prompt_limit(100) == 99
    assert SamplingParams().prompt_limit(100) is None


def test_defaults_follow_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.seed is None and p.logprobs is None and not p.ignore_eos


def test_the_spec_carries_the_checked_params_and_what_the_front_end_resolved():
    p = SamplingParams(temperature=0.5, top_k=4, stop_token_ids=[5], seed=3, logit_bias={7: 1.0})
    spec = SamplingSpec.from_params(p, eos_token_ids=[2], bad_words_token_ids=[[8]], grammar="g")
    assert (spec.temperature, spec.top_k, spec.seed, spec.logit_bias) == (0.5, 4, 3, {7: 1.0})
    assert (spec.eos_token_ids, spec.bad_words_token_ids, spec.grammar) == ([2], [[8]], "g")
    assert spec.all_stop_token_ids == {2, 5} and not spec.is_greedy
    ignoring = SamplingSpec.from_params(
        SamplingParams(stop_token_ids=[5], ignore_eos=True), eos_token_ids=[2]
    )
    assert ignoring.all_stop_token_ids == {5}
    assert SamplingSpec.from_params(SamplingParams(temperature=0)).is_greedy
    # On the wire: decoding does not validate again, and the spec round-trips unchanged.
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(spec), type=SamplingSpec)
    assert wire == spec


def test_from_optional_drops_none_and_clone_is_deep():
    p = SamplingParams.from_optional(temperature=None, top_p=0.9, stop=None, max_tokens=None)
    assert p.temperature == 1.0 and p.top_p == 0.9 and p.stop == [] and p.max_tokens == 16
    c = p.clone()
    c.stop.append("x")
    assert p.stop == []


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("beam_width", {"beam_width": 0, "max_tokens": 4}),
        ("max_tokens", {"beam_width": 2, "max_tokens": 0}),
        ("temperature", {"beam_width": 2, "max_tokens": 4, "temperature": -1.0}),
        ("temperature", {"beam_width": 2, "max_tokens": 4, "temperature": "hot"}),
        ("length_penalty", {"beam_width": 2, "max_tokens": 4, "length_penalty": None}),
        ("beam_width", {"beam_width": 2.0, "max_tokens": 4}),
        ("ignore_eos", {"beam_width": 2, "max_tokens": 4, "ignore_eos": "yes"}),
    ],
)
def test_beam_search_params_validation(name, kwargs):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        BeamSearchParams(**kwargs)
