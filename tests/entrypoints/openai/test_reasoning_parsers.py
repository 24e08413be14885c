"""Reasoning parsers: the reasoning and content of a whole reply, and the same two strings however a
stream splits the reply (one character at a time included)."""

from __future__ import annotations

import pytest

from distgen.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    DeepSeekR1ReasoningParser,
    ReasoningParser,
)
from tests.entrypoints.openai.test_tool_parsers import splits


def run(parser_cls, deltas: list[str]) -> tuple[str, str]:
    parser = parser_cls()
    parts = [parser.feed(d) for d in deltas] + [parser.finish()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


QWEN3 = [
    ("<think>\nSix times seven.\n</think>\n\n42", "Six times seven.", "42"),
    ("<think>\n\n</think>\n\nHello!", "", "Hello!"),  # enable_thinking=False's empty block
    ("Hello, no thinking here.", "", "Hello, no thinking here."),
    ("  <think>a  b</think>c  ", "a  b", "c  "),
    ("<think>\nstill thinking when max_tokens hit  ", "still thinking when max_tokens hit", ""),
    ("<thin", "", "<thin"),  # a partial tag at the end is content
    ("x < y </think> z", "", "x < y </think> z"),  # no opening tag: all content
    ("<think>a</thinking> b</think>c", "a</thinking> b", "c"),
]


@pytest.mark.parametrize("text, reasoning, content", QWEN3)
def test_qwen3(text, reasoning, content):
    for i, deltas in enumerate(splits(text, seed=len(text))):
        assert run(ReasoningParser, deltas) == (reasoning, content), (i, deltas)


DEEPSEEK_R1 = [
    ("Six times seven.\n</think>\n\n42", "Six times seven.", "42"),  # <think> was in the prompt
    ("<think>\nSix times seven.</think>42", "Six times seven.", "42"),  # or the model writes it
    ("never closed", "never closed", ""),
    ("\n</think>\n\nAnswer only.", "", "Answer only."),
]


@pytest.mark.parametrize("text, reasoning, content", DEEPSEEK_R1)
def test_deepseek_r1(text, reasoning, content):
    for i, deltas in enumerate(splits(text, seed=len(text))):
        assert run(DeepSeekR1ReasoningParser, deltas) == (reasoning, content), (i, deltas)


def test_the_stream_shows_no_tag_and_reasoning_as_it_comes():
    parser = ReasoningParser()
    assert parser.feed("<th") == ("", "")
    assert parser.feed("ink>\nStep one") == ("Step one", "")
    assert parser.feed(", step two.\n</thi") == (", step two.", "")
    assert parser.feed("nk>\n\nDone") == ("", "Done")
    assert parser.finish() == ("", "")
    assert set(REASONING_PARSERS) == {"qwen3", "deepseek_r1"}


@pytest.mark.parametrize("cls", [ReasoningParser, DeepSeekR1ReasoningParser])
def test_a_prompt_that_closed_the_think_block_leaves_all_content(cls):
    for deltas in splits("\n\nThe answer, <think>quoted</think>.", seed=3):
        parser = cls(thinking_done=True)
        parts = [parser.feed(d) for d in deltas] + [parser.finish()]
        assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == (
            "",
            "The answer, <think>quoted</think>.",
        )
