"""Structured outputs: grammars compiled from each kind of constraint (bad ones named), the packed
masks rank 0 computes from a request's tokens, and their unpacking."""

from __future__ import annotations

import json
import logging
import re

import msgspec
import pytest
import torch

from distgen.sampling_params import SamplingParams, StructuredOutputsParams
from distgen.sampling_spec import SamplingSpec
from distgen.structured_output import (
    GrammarError,
    allows_other_than,
    compile_grammar,
    grammar_tokenizer,
    unpack_bitmask,
)
from distgen.workers.grammar_matchers import GrammarMatchers, end_of
from distgen.workers.input_batch import CachedRequestState

EOS = 2


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer):
    return smollm2_tokenizer


@pytest.fixture(scope="module")
def ll_tok(tok):
    return grammar_tokenizer(tok, len(tok), [EOS])


def _row(
    tok, ll_tok, spec: StructuredOutputsParams, output: str = "", req_id: str = "r"
) -> CachedRequestState:
    params = SamplingSpec(eos_token_ids=[EOS], grammar=compile_grammar(spec, ll_tok))
    out = tok(output, add_special_tokens=False).input_ids if output else []
    return CachedRequestState(req_id, [1, 2, 3, *out], 3, params, [0], 3 + len(out))


def _allowed(tok, matchers: GrammarMatchers, rows) -> list[set[int]]:
    bitmask = matchers.bitmask(rows)
    allowed = unpack_bitmask(bitmask.packed, len(tok))
    return [set(allowed[k].nonzero().flatten().tolist()) for k in range(len(bitmask.rows))]


def test_unpack_bitmask():
    packed = torch.tensor([[0b101, -1], [0, -(1 << 31)]], dtype=torch.int32)  # -(1 << 31): bit 31 alone
    got = unpack_bitmask(packed, 64)
    assert got.shape == (2, 64) and got.dtype == torch.bool
    assert got[0].nonzero().flatten().tolist() == [0, 2, *range(32, 64)]
    assert got[1].nonzero().flatten().tolist() == [63]
    assert not unpack_bitmask(packed, 40)[1].any()  # token 63 is past a 40-token vocabulary


def test_allows_other_than():
    row = torch.tensor([1 << 2, 1 << 8], dtype=torch.int32)  # tokens 2 and 40
    assert allows_other_than(row, {2}) and allows_other_than(row, set()) and allows_other_than(row, {3, 99})
    assert not allows_other_than(row, {2, 40}) and not allows_other_than(row, {2, 40, 7})


@pytest.mark.parametrize(
    "spec",
    [
        StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}}}),
        StructuredOutputsParams(json='{"type": "array", "items": {"type": "boolean"}}'),
        StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
        StructuredOutputsParams(regex=r"[0-9]{3}"),
        StructuredOutputsParams(choice=["yes", 'no "way"']),
        StructuredOutputsParams(grammar='start: "a" | "b"'),  # Lark
        StructuredOutputsParams(grammar='root ::= "a" | "b"'),  # GBNF
    ],
)
def test_every_kind_compiles(spec, ll_tok):
    assert compile_grammar(spec, ll_tok)


@pytest.mark.parametrize(
    "spec, needle",
    [
        (StructuredOutputsParams(json="{not json"), "structured_outputs.json is not valid JSON"),
        (StructuredOutputsParams(json='"a string"'), "must be a JSON schema object"),
        (StructuredOutputsParams(json={"type": "objectx"}), "structured_outputs.json does not compile"),
        (StructuredOutputsParams(regex="[a-"), "structured_outputs.regex does not compile"),
        (StructuredOutputsParams(grammar="%%% nonsense"), "structured_outputs.grammar does not compile"),
    ],
)
def test_a_bad_constraint_names_itself(spec, needle, ll_tok):
    with pytest.raises(GrammarError, match=re.escape(needle)):
        compile_grammar(spec, ll_tok)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({}, "exactly one of json, regex, choice, grammar, json_object; got none"),
        ({"regex": "a", "choice": ["b"]}, "got regex, choice"),
        ({"regex": 5}, "regex has the wrong type"),
        ({"choice": []}, "exactly one"),
        ({"choice": ["a", ""]}, "non-empty strings"),
        ({"json": [1]}, "json has the wrong type"),
    ],
)
def test_structured_outputs_params_validation(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        StructuredOutputsParams(**kwargs)


def test_sampling_params_take_a_dict_and_name_a_wrong_key():
    assert SamplingParams(structured_outputs={"regex": "a+"}).structured_outputs == StructuredOutputsParams(
        regex="a+"
    )
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs"):
        SamplingParams(structured_outputs={"regexp": "a+"})
    with pytest.raises(ValueError, match="SamplingParams.structured_outputs must be"):
        SamplingParams(structured_outputs="a+")


def test_masks_follow_each_rows_tokens(tok, ll_tok):
    matchers = GrammarMatchers(lambda: tok, len(tok))
    choice = StructuredOutputsParams(choice=["positive", "negative"])
    digits = StructuredOutputsParams(regex=r"[0-9]{2}")
    plain = CachedRequestState("p", [1, 2], 2, SamplingSpec(), [0], 2)
    rows = [plain, _row(tok, ll_tok, choice, req_id="c"), _row(tok, ll_tok, digits, "7", req_id="d")]
    first, second = _allowed(tok, matchers, rows)
    assert all(
        tok.decode([t]) and ("positive".startswith(tok.decode([t])) or "negative".startswith(tok.decode([t])))
        for t in first
    )
    assert tok("positive", add_special_tokens=False).input_ids[0] in first
    assert {tok.decode([t]) for t in second} == {str(d) for d in range(10)}  # one more digit, then EOS
    # The matcher catches up on tokens that arrive later, and after the last digit allows only EOS.
    rows[2].output_token_ids.extend(tok("3", add_special_tokens=False).input_ids)
    assert _allowed(tok, matchers, rows)[1] == {EOS}
    assert matchers.bitmask([plain]) is None


def test_a_row_that_leaves_its_grammar_is_stopped_where_it_still_fits(tok, ll_tok, caplog):
    matchers = GrammarMatchers(lambda: tok, len(tok))
    row = _row(tok, ll_tok, StructuredOutputsParams(regex=r"[0-9]+"), "12ab")
    row.sampling_params = msgspec.structs.replace(row.sampling_params, stop_token_ids=[7])
    with caplog.at_level(logging.WARNING, logger="distgen"):
        (allowed,) = _allowed(tok, matchers, [row])
        _allowed(tok, matchers, [row])
    assert allowed == {EOS, 7}  # only what ends it
    assert sum("left its grammar" in r.message for r in caplog.records) == 1  # warned once
    # With nothing that could end it (ignore_eos, no stop ids), it goes on unconstrained.
    row.sampling_params = msgspec.structs.replace(row.sampling_params, stop_token_ids=[], ignore_eos=True)
    assert len(_allowed(tok, matchers, [row])[0]) == len(tok)


def test_many_choices_with_any_characters(tok, ll_tok):
    """Thousands of choices (llguidance's own choice format fails past 2000 at run time), and choices
    with quotes, backslashes, newlines and non-ASCII text, each walked token by token."""
    odd = ['say "hi"', "back\\slash", "two\nlines", "naïve café", "😀 face"]
    spec = StructuredOutputsParams(choice=[f"option {i}" for i in range(3000)] + odd)
    matchers = GrammarMatchers(lambda: tok, len(tok))
    for text in ["option 2999", *odd]:
        row = _row(tok, ll_tok, spec)
        for t in tok(text, add_special_tokens=False).input_ids:
            assert t in _allowed(tok, matchers, [row])[0], (text, t)
            row.output_token_ids.append(t)
        assert _allowed(tok, matchers, [row])[0] == {EOS}, text


def test_json_schema_mask_admits_a_valid_object(tok, ll_tok):
    """Walking a valid object token by token, each token is allowed when it comes."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    row = _row(tok, ll_tok, StructuredOutputsParams(json=schema, disable_any_whitespace=True))
    matchers = GrammarMatchers(lambda: tok, len(tok))
    for t in tok(json.dumps({"n": 42}, separators=(",", ":")), add_special_tokens=False).input_ids:
        assert t in _allowed(tok, matchers, [row])[0]
        row.output_token_ids.append(t)
    assert _allowed(tok, matchers, [row])[0] == {EOS}


def test_end_of():
    assert end_of([5, 6], [1, 5, 6, 5, 6]) == 3
    assert end_of([5, 6], [1, 5, 6, 5, 6], start=2) == 5
    assert end_of([5, 6], [1, 5, 7, 6]) is None and end_of([5], []) is None


def test_a_grammar_after_thinking_waits_for_its_end(tok, ll_tok):
    """With ``grammar_after`` (a server's reasoning parser), tokens are free until the marker, which
    may arrive split over steps; the grammar then reads only what follows it."""
    matchers = GrammarMatchers(lambda: tok, len(tok))
    row = _row(tok, ll_tok, StructuredOutputsParams(regex=r"[0-9]{2}"))
    marker = tok("</think>", add_special_tokens=False).input_ids
    assert len(marker) > 1  # SmolLM2 spells it in pieces: the search must cope with a split
    row.sampling_params = msgspec.structs.replace(row.sampling_params, grammar_after=marker)
    thinking = tok("Let me see </ think", add_special_tokens=False).input_ids
    for t in thinking + marker[:-1]:
        row.output_token_ids.append(t)
        assert len(_allowed(tok, matchers, [row])[0]) == len(tok)  # still thinking: free
    row.output_token_ids.append(marker[-1])
    assert {tok.decode([t]) for t in _allowed(tok, matchers, [row])[0]} == {str(d) for d in range(10)}
    row.output_token_ids.extend(tok("42", add_special_tokens=False).input_ids)
    assert _allowed(tok, matchers, [row])[0] == {EOS}
