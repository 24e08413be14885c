"""Chat completions with tools, through the real app and the official ``openai`` client, over a scripted
engine: a tiny random model never writes a tool call, so the engine here replays a chosen reply,
delta by delta, the way ``AsyncLLM`` streams one (some deltas' text held back to the next)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from types import SimpleNamespace

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from distgen.entrypoints.openai.api_server import ServerArgs, build_app
from distgen.outputs import CompletionOutput, Logprob, RequestOutput

TEMPLATE = (
    "{% if tools %}TOOLS:{% for t in tools %} {{ t.function.name }}{% endfor %} | {% endif %}"
    "{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %} CALL {{ c.function.name }}"
    "({{ c.function.arguments.city }}){% endfor %}"
    " | {% endfor %}assistant:"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MESSAGES = [{"role": "user", "content": "Weather in Paris and Rome?"}]
HERMES_REPLY = (
    "Checking both.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)


class ScriptedEngine:
    """What the chat handler uses of ``AsyncLLM``; ``generate`` replays ``reply`` token by token."""

    def __init__(self, tokenizer, reply: str) -> None:
        self.tokenizer = tokenizer
        self.reply = reply
        self.max_model_len = 4096
        self.config = SimpleNamespace(model=SimpleNamespace(vocab_size=len(tokenizer), model="scripted"))
        self.generation_defaults: dict = {}
        self.errored = False
        self.stat_loggers: list = []
        self.prompts: list[str] = []

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt, params, request_id) -> AsyncIterator[RequestOutput]:
        self.prompts.append(prompt["prompt"])
        ids = self.tokenizer(self.reply, add_special_tokens=False).input_ids
        held = ""
        for i, tid in enumerate(ids):
            piece = self.tokenizer.decode(ids[: i + 1])[len(self.tokenizer.decode(ids[:i])) :]
            last = i == len(ids) - 1
            text, held = ("", held + piece) if i % 3 == 1 and not last else (held + piece, "")
            lps = [{tid: Logprob(-0.25, 1, piece)}] if params.logprobs is not None else None
            outs = [
                CompletionOutput(j, text, [tid], None, lps, "stop" if last else None) for j in range(params.n)
            ]
            yield RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"], None, outs, last)


def client_for(engine: ScriptedEngine, **server) -> openai.OpenAI:
    app = build_app(engine, ServerArgs(chat_template=TEMPLATE, **server), ["scripted"])
    http = TestClient(app, raise_server_exceptions=False)
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


@pytest.fixture
def hermes(smollm2_tokenizer):
    engine = ScriptedEngine(smollm2_tokenizer, HERMES_REPLY)
    return engine, client_for(engine, enable_auto_tool_choice=True, tool_call_parser="hermes")


def _calls(tool_calls) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls]


WANT = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]


def test_tool_calls_are_read_out_of_the_reply(hermes):
    engine, client = hermes
    got = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS, n=2)
    assert engine.prompts[-1].startswith(
        "TOOLS: get_weather | user: Weather"
    )  # the template was given the tools
    for choice in got.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking both.\n"
        assert _calls(choice.message.tool_calls) == WANT
        assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    assert len({c.id for ch in got.choices for c in ch.message.tool_calls}) == 4


def test_streamed_tool_calls_equal_the_whole_reply_and_never_show_markup(hermes):
    _, client = hermes
    chunks = list(
        client.chat.completions.create(
            model="scripted", messages=MESSAGES, tools=TOOLS, stream=True, logprobs=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    content = "".join(d.content or "" for d in deltas)
    assert content == "Checking both.\n" and "<tool" not in content
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [tc.index for tc in calls] == [0, 1] and _calls(calls) == WANT
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # Every token's logprob entry is sent once, including those of deltas whose text was held back.
    entries = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    n_tokens = len(hermes[0].tokenizer(HERMES_REPLY, add_special_tokens=False).input_ids)
    assert len(entries) == n_tokens


def test_earlier_calls_in_the_conversation_reach_the_template_as_objects(hermes):
    engine, client = hermes
    history = [
        *MESSAGES,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    client.chat.completions.create(model="scripted", messages=history, tools=TOOLS)
    assert "CALL get_weather(Paris)" in engine.prompts[-1] and "tool: 18 C, sunny" in engine.prompts[-1]


def test_a_reply_without_calls_is_plain_content(smollm2_tokenizer):
    engine = ScriptedEngine(smollm2_tokenizer, "It is sunny; <b>no</b> tool needed.")
    client = client_for(engine, enable_auto_tool_choice=True, tool_call_parser="hermes")
    got = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS)
    assert got.choices[0].message.content == "It is sunny; <b>no</b> tool needed."
    assert not got.choices[0].message.tool_calls and got.choices[0].finish_reason == "stop"
    # tool_choice "none": the tools are not given to the template, and nothing is parsed.
    engine.reply = HERMES_REPLY
    got = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS, tool_choice="none")
    assert got.choices[0].message.content == HERMES_REPLY and not got.choices[0].message.tool_calls
    assert not engine.prompts[-1].startswith("TOOLS")


def test_llama3_json_parser(smollm2_tokenizer):
    reply = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    engine = ScriptedEngine(smollm2_tokenizer, reply)
    client = client_for(engine, enable_auto_tool_choice=True, tool_call_parser="llama3_json")
    got = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS)
    assert got.choices[0].message.content is None
    assert _calls(got.choices[0].message.tool_calls) == [("get_weather", {"city": "Oslo"})]
    chunks = list(
        client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS, stream=True)
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert _calls(calls) == [("get_weather", {"city": "Oslo"})]


def _error(resp: httpx.Response, param: str, *needles: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and all(n in err["message"] for n in needles), err


def test_requests_the_server_cannot_honour_are_400s(smollm2_tokenizer):
    engine = ScriptedEngine(smollm2_tokenizer, HERMES_REPLY)
    body = {"messages": MESSAGES, "tools": TOOLS}
    plain = TestClient(build_app(engine, ServerArgs(), ["scripted"]))
    _error(plain.post("/v1/chat/completions", json=body), "tools", "--enable-auto-tool-choice", "hermes")
    tools = TestClient(
        build_app(engine, ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes"), ["x"])
    )
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        _error(
            tools.post("/v1/chat/completions", json={**body, "tool_choice": choice}), "tool_choice", "guided"
        )
    resp = tools.post("/v1/chat/completions", json={**body, "tool_choice": "sometimes"})
    assert resp.status_code == 400 and resp.json()["error"]["param"].startswith("tool_choice")
    resp = tools.post("/v1/chat/completions", json={**body, "tools": [{"type": "function", "function": {}}]})
    assert resp.status_code == 400 and "tools.0.function.name" in resp.json()["error"]["message"]
    assert not engine.prompts  # nothing reached the engine


def test_server_args_check_the_parser():
    with pytest.raises(ValueError, match="needs --tool-call-parser"):
        ServerArgs(enable_auto_tool_choice=True)
    with pytest.raises(
        ValueError, match="unknown tool call parser 'pythonic'; there are: hermes, llama3_json"
    ):
        ServerArgs(enable_auto_tool_choice=True, tool_call_parser="pythonic")
