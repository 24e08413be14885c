"""Reasoning in a chat model's text: ``<think>...</think>`` split off as ``reasoning_content``.

Fed a choice's text delta by delta (the whole text at once is one delta), a parser returns each
delta's ``(reasoning, content)``. Text that may be the start of a tag is held back until it is certain,
and so is whitespace at the edges of the reasoning and at the start of the content, which is not
shown; the same text split any way gives the same two strings.
``distgen serve --reasoning-parser NAME`` picks a parser from ``REASONING_PARSERS``; with one (there,
or ``LLM(reasoning_parser=NAME)`` offline) a structured-output constraint holds only once the thinking
has ended.
"""

from __future__ import annotations

from distgen.entrypoints.openai.tool_parsers import held_prefix
from distgen.sampling_params import SamplingParams

START, END = "<think>", "</think>"


class ReasoningParser:
    """Qwen3's way (also QwQ): the reply may open with ``<think>``; without it, it is all content
    (``enable_thinking=False`` in ``chat_template_kwargs``)."""

    # Where the reply starts: "open" (it may start with <think>), "reasoning" (the chat template
    # opened the think block in the prompt, as DeepSeek-R1's does).
    starts_in = "open"

    def __init__(self, thinking_done: bool = False) -> None:
        """``thinking_done``: the prompt already closed the think block (Qwen3's chat template with
        ``enable_thinking=False`` ends it with an empty one), so the reply is all content."""
        self._state = "content" if thinking_done else self.starts_in  # "open" -> "reasoning" -> "content"
        self._buf = ""  # text held back
        self._shown_reasoning = False  # leading whitespace of the reasoning is dropped
        self._shown_content = False  # and so is that of the content

    def feed(self, text: str) -> tuple[str, str]:
        self._buf += text
        reasoning, content = [], []
        while self._buf:
            if self._state == "open":
                start = self._buf.lstrip()
                if START.startswith(start):
                    if start != START:
                        break  # maybe the tag: wait
                    self._buf, self._state = start[len(START) :], "reasoning"
                elif start.startswith(START):
                    self._buf, self._state = start[len(START) :], "reasoning"
                else:
                    self._state = "content"
            elif self._state == "reasoning":
                end = self._buf.find(END)
                if end >= 0:
                    reasoning.append(self._reasoning(self._buf[:end].rstrip()))
                    self._buf, self._state = self._buf[end + len(END) :], "content"
                    continue
                # Hold a possible tag, and trailing whitespace (dropped if the tag comes next).
                keep = held_prefix(self._buf, END)
                body = self._buf[: len(self._buf) - keep]
                text_part = body.rstrip()
                reasoning.append(self._reasoning(text_part))
                self._buf = self._buf[len(text_part) :]
                break
            else:
                if not self._shown_content:
                    self._buf = self._buf.lstrip()
                    if not self._buf:
                        break
                    self._shown_content = True
                content.append(self._buf)
                self._buf = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The reply is complete: what was held back. An unclosed think block is all reasoning."""
        text, self._buf = self._buf, ""
        if self._state == "reasoning":
            return self._reasoning(text.rstrip()), ""
        if self._state == "open":  # only whitespace or a partial tag: content
            return "", text.lstrip() if not self._shown_content else text
        return "", text if self._shown_content else text.lstrip()

    def _reasoning(self, text: str) -> str:
        if not self._shown_reasoning:
            text = text.lstrip()
            self._shown_reasoning = bool(text)
        return text


class DeepSeekR1ReasoningParser(ReasoningParser):
    """DeepSeek-R1's way: its chat template opens ``<think>`` in the prompt, so the reply is reasoning
    until ``</think>`` (a reply that never closes it is all reasoning); a ``<think>`` the model writes
    itself is skipped."""

    starts_in = "open_r1"

    def feed(self, text: str) -> tuple[str, str]:
        if self._state == "open_r1":
            self._buf += text
            start = self._buf.lstrip()
            if START.startswith(start) and start != START:
                return "", ""  # maybe a <think> of its own: wait
            self._buf, self._state = start.removeprefix(START), "reasoning"
            text = ""
        return super().feed(text)

    def finish(self) -> tuple[str, str]:
        if self._state == "open_r1":
            self._state = "reasoning"
        return super().finish()


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "qwen3": ReasoningParser,
    "deepseek_r1": DeepSeekR1ReasoningParser,
}


def check_reasoning_parser(name: str | None) -> None:
    if name is not None and name not in REASONING_PARSERS:
        known = ", ".join(REASONING_PARSERS)
        raise ValueError(f"unknown reasoning parser {name!r}; there are: {known}")


def thinks_first(prompt_text: str) -> bool:
    """Whether a reply to this prompt may start with thinking: not when the prompt closed the think
    block itself (Qwen3's template with ``enable_thinking=False`` ends with an empty one)."""
    return not prompt_text.rstrip().endswith(END)


def constrain_after_thinking(params: SamplingParams, prompt_text: str, end_ids: list[int]) -> SamplingParams:
    """As vLLM does with a reasoning parser: a reply that may think first (``thinks_first``) thinks
    freely, and its structured-output constraint holds from the end of the thinking (``end_ids``, the
    tokens of ``</think>``). Returns ``params`` itself when nothing changes, else a copy."""
    if params.structured_outputs is None or not thinks_first(prompt_text):
        return params
    params = params.clone()
    params._grammar_after = end_ids
    return params


def end_token_ids(tokenizer) -> list[int]:
    """The tokens that end the model's thinking (``</think>``), after which a structured-output
    constraint holds (``SamplingSpec.grammar_after``), as vLLM does with a reasoning parser."""
    return tokenizer(END, add_special_tokens=False).input_ids
