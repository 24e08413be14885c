"""The input processor is the one place a prompt is tokenized, truncated and checked, and the one place the
model's generation-config defaults are applied: its typed errors, its truncation, and a prepared prompt
taken as it is (checked once) by ``process``."""

from __future__ import annotations

import json
import shutil

import pytest

from distgen.exceptions import InvalidPromptError, PromptTooLongError
from distgen.frontend import input_processor as ip
from distgen.frontend.args import EngineArgs
from distgen.frontend.input_processor import (
    CheckedPrompt,
    InputProcessor,
    PromptRules,
    sampling_params_with_defaults,
)
from distgen.sampling_params import SamplingParams

LIMIT = 16


@pytest.fixture
def rules(smollm2_tokenizer) -> PromptRules:
    return PromptRules(smollm2_tokenizer, LIMIT, len(smollm2_tokenizer))


def test_too_long_prompt_is_a_typed_error_with_its_numbers(rules):
    with pytest.raises(PromptTooLongError) as info:
        rules.prepare([5] * LIMIT)
    e = info.value
    assert isinstance(e, InvalidPromptError) and isinstance(e, ValueError)
    assert (e.num_tokens, e.max_model_len, e.chars, e.param) == (LIMIT, LIMIT, None, "prompt")
    assert str(e).startswith(f"the prompt has {LIMIT} tokens, but the maximum model length is {LIMIT}")
    assert rules.prepare([5] * (LIMIT - 1)).token_ids == [5] * (LIMIT - 1)  # one token of room is enough


def test_bad_ids_and_empty_prompts_are_invalid_not_too_long(rules):
    vocab = rules.vocab_size
    for prompt, needle in (([5, vocab], f"prompt token id {vocab} is out of the vocabulary"), ([], "empty")):
        with pytest.raises(InvalidPromptError, match=needle) as info:
            rules.prepare(prompt)
        assert not isinstance(info.value, PromptTooLongError) and info.value.param == "prompt"
    with pytest.raises(InvalidPromptError, match="out of the vocabulary"):
        rules.prepare([-1, 5])


def test_truncation_keeps_the_last_tokens_and_their_text(rules, smollm2_tokenizer):
    ids = list(range(100, 140))
    assert rules.prepare(ids, truncate_prompt_tokens=5).token_ids == ids[-5:]
    kept = rules.prepare(ids, truncate_prompt_tokens=-1)  # as many as fit, with room for one more
    assert kept.token_ids == ids[-(LIMIT - 1) :] and kept.text is None
    text = "one two three four five six seven eight nine ten " * 4
    whole = smollm2_tokenizer(text).input_ids
    cut = rules.prepare(text, truncate_prompt_tokens=3)
    assert cut.token_ids == whole[-3:] and cut.text == smollm2_tokenizer.decode(whole[-3:])
    short = rules.prepare({"prompt": "hi", "prompt_token_ids": [7, 8]}, truncate_prompt_tokens=5)
    assert (short.text, short.token_ids) == ("hi", [7, 8])  # short enough: untouched


def test_text_is_measured_before_it_is_tokenized_when_asked(rules, smollm2_tokenizer):
    """With ``token_chars`` (the server's), text too long whatever its tokens is refused by its length,
    naming the field it came from; truncated text is not measured (its length says nothing)."""
    measured = PromptRules(smollm2_tokenizer, LIMIT, rules.vocab_size, token_chars=4)
    text = "x" * (4 * LIMIT)
    with pytest.raises(PromptTooLongError) as info:
        measured.prepare(text, param="messages")
    e = info.value
    assert (e.chars, e.token_chars, e.num_tokens, e.param) == (4 * LIMIT, 4, LIMIT, "messages")
    assert "64 characters, at least 16 tokens" in str(e)
    assert len(measured.prepare(text, truncate_prompt_tokens=3).token_ids) == 3
    with pytest.raises(PromptTooLongError) as info:  # unmeasured: tokenized, then counted
        rules.prepare("hello " * LIMIT, param="messages")
    assert info.value.chars is None and info.value.param == "prompt"


def test_text_that_is_not_unicode_names_its_field(rules):
    with pytest.raises(InvalidPromptError, match=r"not valid Unicode text: '\\ud800' at character 3") as info:
        rules.prepare("Hi \ud800", param="messages")
    assert info.value.param == "messages"


def test_a_checked_prompt_is_taken_as_it_is(rules):
    checked = rules.prepare([5, 6, 7])
    assert isinstance(checked, CheckedPrompt) and checked == {"prompt": None, "prompt_token_ids": [5, 6, 7]}
    assert rules.prepare(checked, truncate_prompt_tokens=1) is checked


def test_generation_config_defaults_fill_only_what_is_silent():
    defaults = {"temperature": 0.25, "top_k": 7, "max_tokens": 5}
    p = sampling_params_with_defaults(defaults, temperature=None, top_k=3, seed=None)
    assert (p.temperature, p.top_k, p.max_tokens, p.seed) == (0.25, 3, 5, None)
    assert sampling_params_with_defaults(defaults, max_tokens=9, temperature=0.0).max_tokens == 9
    assert sampling_params_with_defaults({}) == SamplingParams()


@pytest.fixture(scope="module")
def processor(tiny_model_dir, tmp_path_factory) -> InputProcessor:
    d = tmp_path_factory.mktemp("genconfig") / "model"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "generation_config.json").write_text(json.dumps({"temperature": 0.25, "top_k": 7}))
    return InputProcessor(EngineArgs(model=str(d), max_model_len=64).create_config())


def test_processor_applies_the_models_defaults_once(processor):
    p = processor.default_sampling_params()
    assert (p.temperature, p.top_k, p.top_p) == (0.25, 7, 1.0)


def test_process_checks_each_prompt_once(processor, monkeypatch):
    """A raw prompt is tokenized, cut and checked in ``process``; one the server prepared is not
    checked again (the request path has one check, the engine core's guard aside)."""
    calls = []
    real = ip.validate_prompt
    monkeypatch.setattr(ip, "validate_prompt", lambda *a: (calls.append(a[0]), real(*a))[1])
    params = SamplingParams(max_tokens=2, truncate_prompt_tokens=4)
    new = processor.process("r0", list(range(10, 30)), params, 0.0, max_model_len=32)
    assert new.prompt_token_ids == [26, 27, 28, 29] and len(calls) == 1
    checked = processor.rules(32).prepare(list(range(10, 20)), 4)
    new = processor.process("r1", checked, params, 0.0, max_model_len=32)
    assert new.core_requests[0].prompt_token_ids == [16, 17, 18, 19] and len(calls) == 2
    with pytest.raises(
        PromptTooLongError, match="the prompt has 32 tokens, but the maximum model length is 32"
    ):
        processor.process("r2", [5] * 32, SamplingParams(), 0.0, max_model_len=32)
