"""Tool-call parsers: the calls and content of a whole text, and the same events however a stream
splits that text into deltas (one character at a time included)."""

from __future__ import annotations

import json
import random

import pytest

from distgen.entrypoints.openai.tool_parsers import PARSERS, HermesToolParser, Llama3JsonToolParser, ToolCall

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'


def run(parser_cls, deltas: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    """Feed the deltas; the content joined and the calls as (name, decoded arguments)."""
    parser = parser_cls()
    events = [e for d in deltas for e in parser.feed(d)] + parser.finish()
    content = "".join(e for e in events if isinstance(e, str))
    calls = [(e.name, json.loads(e.arguments)) for e in events if isinstance(e, ToolCall)]
    assert parser.num_calls == len(calls)
    return content, calls


def splits(text: str, seed: int) -> list[list[str]]:
    """The text whole, one character at a time, and cut at random places."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(6, len(text) - 1))) if len(text) > 1 else []
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    return [[text], list(text), pieces]


HERMES_CASES = [
    # (model text, content, calls)
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    (
        f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>\n"
        '{"name": "get_time", "arguments": {}}\n</tool_call>\n',
        "Let me check.\n",
        [("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {})],
    ),
    ("No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    # Arguments written as a JSON string, and vLLM-style "parameters", are both read.
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', "", [("f", {"x": 1})]),
    ('<tool_call>{"name": "f", "parameters": {"x": [1, 2]}}</tool_call>', "", [("f", {"x": [1, 2]})]),
    # Not a call: the markup comes back as content, untouched.
    ("<tool_call>{not json}</tool_call> ok", "<tool_call>{not json}</tool_call> ok", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    # Cut short after a complete object (max_tokens before the closing tag): still a call.
    (f"<tool_call>\n{WEATHER}\n", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    # Cut short inside the object: content.
    ('<tool_call>\n{"name": "get_wea', '<tool_call>\n{"name": "get_wea', []),
    # A stream that ends on a partial marker gives it back.
    ("the end <tool_ca", "the end <tool_ca", []),
]


@pytest.mark.parametrize("text, content, calls", HERMES_CASES)
def test_hermes(text, content, calls):
    for i, deltas in enumerate(splits(text, seed=len(text))):
        assert run(HermesToolParser, deltas) == (content, calls), (i, deltas)


def test_hermes_never_streams_markup_it_then_parses():
    parser = HermesToolParser()
    shown = "".join(
        e for ch in f"Hi <tool_call>{WEATHER}</tool_call>" for e in parser.feed(ch) if isinstance(e, str)
    )
    assert shown == "Hi "


LLAMA_CASES = [
    ('{"name": "get_time", "parameters": {"zone": "UTC"}}', "", [("get_time", {"zone": "UTC"})]),
    (
        '<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": true}}',
        "",
        [("a", {}), ("b", {"k": True})],
    ),
    ('  {"name": "a", "arguments": {"q": "x"}}\n', "", [("a", {"q": "x"})]),
    ("The answer is {42}.", "The answer is {42}.", []),
    ('{"name": "a", "parameters": {}} and then prose', '{"name": "a", "parameters": {}} and then prose', []),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ("<b>bold</b>", "<b>bold</b>", []),
]


@pytest.mark.parametrize("text, content, calls", LLAMA_CASES)
def test_llama3_json(text, content, calls):
    for i, deltas in enumerate(splits(text, seed=len(text))):
        assert run(Llama3JsonToolParser, deltas) == (content, calls), (i, deltas)


def test_llama3_json_streams_prose_as_it_comes():
    parser = Llama3JsonToolParser()
    assert parser.feed(" ") == []  # undecided
    assert parser.feed("Sure") == [" Sure"]
    assert parser.feed(", here") == [", here"]


def test_calls_have_distinct_ids_and_openai_shape():
    _, calls = run(HermesToolParser, [f"<tool_call>{WEATHER}</tool_call><tool_call>{WEATHER}</tool_call>"])
    assert len(calls) == 2
    parser = HermesToolParser()
    a, b = parser.feed(f"<tool_call>{WEATHER}</tool_call>" * 2)
    assert a.id != b.id and a.id.startswith("call_")
    assert b.to_openai(1) == {
        "index": 1,
        "id": b.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
    }
    assert set(PARSERS) == {"hermes", "llama3_json"}
