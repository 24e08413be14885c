"""Tool calls in a chat model's text: each parser reads one model family's way of writing them.

A parser is fed a choice's text delta by delta (the whole text at once is one delta) and gives back
*events*: content text, or a :class:`ToolCall` once it is complete. Text that might be the start of a
call's markup is held back until it is certain either way, so a stream never shows markup it later
turns into a call; markup that turns out not to hold a call (bad JSON, no name) comes back as content.
``distgen serve --enable-auto-tool-choice --tool-call-parser NAME`` picks a parser from ``PARSERS`` for
``tool_choice`` "auto"; "required" and a named function use :class:`RequiredToolsParser` and
:class:`NamedFunctionParser`, whose replies structured outputs hold to JSON.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return call if index is None else {"index": index, **call}


Event = str | ToolCall


def call_from_json(obj: Any, arguments_keys: tuple[str, ...]) -> ToolCall | None:
    """A call from a decoded JSON object with a string ``name`` and an object of arguments under one
    of ``arguments_keys`` (absent: none); None for anything else."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = next((obj[k] for k in arguments_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser(ABC):
    def __init__(self) -> None:
        self.num_calls = 0

    @abstractmethod
    def feed(self, text: str) -> list[Event]:
        """The events that ``text`` (the next delta) makes certain."""

    @abstractmethod
    def finish(self) -> list[Event]:
        """The text is complete: what was held back, as a call if it is one, else as content."""

    def _content(self, events: list[Event], text: str) -> None:
        # Between and after calls, models write newlines; they are not content.
        if text and not (self.num_calls and text.isspace()):
            events.append(text)

    def _call(self, events: list[Event], call: ToolCall) -> None:
        self.num_calls += 1
        events.append(call)


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, anywhere in the text, any number of
    times (Hermes, Qwen2.5, Qwen3 and their chat templates)."""

    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._in_call = False

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while True:
            if not self._in_call:
                at = self._buf.find(self.START)
                if at < 0:
                    keep = held_prefix(self._buf, self.START)
                    self._content(events, self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    return events
                self._content(events, self._buf[:at])
                self._buf, self._in_call = self._buf[at + len(self.START) :], True
            else:
                end = self._buf.find(self.END)
                if end < 0:
                    return events
                body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(self.END) :], False
                self._body(events, body, self.START + body + self.END)

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._in_call:  # cut short (max_tokens, a stop string): a complete object still counts
            self._body(events, self._buf, self.START + self._buf)
        else:
            self._content(events, self._buf)
        self._buf, self._in_call = "", False
        return events

    def _body(self, events: list[Event], body: str, raw: str) -> None:
        try:
            call = call_from_json(json.loads(body), ("arguments", "parameters"))
        except json.JSONDecodeError:
            call = None
        if call is None:
            self._content(events, raw)
        else:
            self._call(events, call)


class WholeReplyParser(ToolParser):
    """Calls that make up the whole reply: held until it ends, then read at once; a reply that does not
    read as calls comes back as content."""

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return []

    def finish(self) -> list[Event]:
        text, self._buf = self._buf, ""
        calls = self.read(text)
        if calls is None:
            return [text] if text else []
        events: list[Event] = []
        for call in calls:
            self._call(events, call)
        return events

    @abstractmethod
    def read(self, text: str) -> list[ToolCall] | None:
        """The calls the whole reply ``text`` holds; None when it is not calls."""


class Llama3JsonToolParser(WholeReplyParser):
    """Llama 3.1-3.3's JSON tool calls: a reply that is ``{"name": ..., "parameters": {...}}`` (several
    separated by ``;``), optionally after ``<|python_tag|>``. A reply that starts any other way is
    content, streamed as it comes; one that starts like a call is held until it ends."""

    TAG = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._mode: str | None = None  # None: undecided; "content" or "call" once the start is seen

    def feed(self, text: str) -> list[Event]:
        if self._mode == "content":
            return [text] if text else []
        self._buf += text
        start = self._buf.lstrip()
        if not start or (self.TAG.startswith(start) and start != self.TAG):
            return []  # not yet known which
        if start.startswith(("{", self.TAG)):
            self._mode = "call"
            return []
        self._mode = "content"
        text, self._buf = self._buf, ""
        return [text]

    def finish(self) -> list[Event]:
        if self._mode == "call":
            return super().finish()
        text, self._buf = self._buf, ""
        return [text] if text else []

    def read(self, text: str) -> list[ToolCall] | None:
        text = text.strip().removeprefix(self.TAG)
        decoder = json.JSONDecoder()
        calls, at = [], 0
        while True:
            while at < len(text) and (text[at].isspace() or (calls and text[at] == ";")):
                at += 1
            if at == len(text):
                return calls or None
            try:
                obj, at = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return None
            call = call_from_json(obj, ("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)


class NamedFunctionParser(WholeReplyParser):
    """``tool_choice`` naming a function: the reply, constrained to that function's parameters schema,
    is the arguments of one call to it."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def read(self, text: str) -> list[ToolCall] | None:
        call = call_from_json({"name": self.name, "arguments": text}, ("arguments",))
        return None if call is None else [call]


class RequiredToolsParser(WholeReplyParser):
    """``tool_choice`` ``"required"``: the reply, constrained to :func:`required_calls_schema`, is a
    JSON array of ``{"name", "parameters"}`` calls."""

    def read(self, text: str) -> list[ToolCall] | None:
        try:
            objs = json.loads(text)
        except json.JSONDecodeError:
            return None
        if not isinstance(objs, list) or not objs:
            return None
        calls = [call_from_json(obj, ("parameters",)) for obj in objs]
        return None if any(c is None for c in calls) else calls


def required_calls_schema(functions: list[dict[str, Any]], parallel: bool = True) -> dict[str, Any]:
    """A JSON schema for one or more calls of ``functions`` (OpenAI function definitions); exactly one
    unless ``parallel``."""
    one_of_each = [
        {
            "type": "object",
            "properties": {
                "name": {"const": fn["name"]},
                "parameters": fn.get("parameters") or {"type": "object"},
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for fn in functions
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    return schema if parallel else {**schema, "maxItems": 1}


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}
