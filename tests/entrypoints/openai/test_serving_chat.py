"""Chat completions with tools, through the real app and the official ``openai`` client, over a scripted
engine: a tiny random model never writes a tool call, so the engine here replays a chosen reply,
delta by delta, the way ``AsyncLLM`` streams one (some deltas' text held back to the next)."""

from __future__ import annotations

import functools
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
        self.params: list = []  # each request's SamplingParams

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt, params, request_id, priority: int = 0) -> AsyncIterator[RequestOutput]:
        self.prompts.append(prompt["prompt"])
        self.params.append(params)
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


def test_parallel_tool_calls_false_keeps_one_call(hermes):
    engine, client = hermes
    got = client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False
    )
    assert _calls(got.choices[0].message.tool_calls) == WANT[:1]
    chunks = client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=TOOLS, parallel_tool_calls=False, stream=True
    )
    assert _calls([tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]) == WANT[:1]
    engine.reply = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=TOOLS, tool_choice="required", parallel_tool_calls=False
    )
    assert engine.params[-1].structured_outputs.json["maxItems"] == 1


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


def test_required_and_named_tool_choice_constrain_the_reply_to_json(smollm2_tokenizer):
    """No parser needed: the reply is constrained to JSON calls (required) or to the named
    function's arguments, and read back as calls."""
    engine = ScriptedEngine(smollm2_tokenizer, '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]')
    client = client_for(engine)  # started without --enable-auto-tool-choice
    got = client.chat.completions.create(
        model="scripted", messages=MESSAGES, tools=TOOLS, tool_choice="required"
    )
    assert _calls(got.choices[0].message.tool_calls) == [("get_weather", {"city": "Oslo"})]
    assert got.choices[0].message.content is None and got.choices[0].finish_reason == "tool_calls"
    schema = engine.params[-1].structured_outputs.json
    assert schema["type"] == "array" and schema["minItems"] == 1
    (item,) = schema["items"]["anyOf"]
    assert item["properties"]["name"] == {"const": "get_weather"}
    assert item["properties"]["parameters"] == TOOLS[0]["function"]["parameters"]
    assert engine.prompts[-1].startswith("TOOLS: get_weather")

    engine.reply = '{"city": "Lima"}'
    named = {"type": "function", "function": {"name": "get_weather"}}
    chunks = list(
        client.chat.completions.create(
            model="scripted", messages=MESSAGES, tools=TOOLS, tool_choice=named, stream=True
        )
    )
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert _calls(calls) == [("get_weather", {"city": "Lima"})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    assert engine.params[-1].structured_outputs.json == TOOLS[0]["function"]["parameters"]


def test_response_format_and_guided_fields_become_one_constraint(smollm2_tokenizer):
    engine = ScriptedEngine(smollm2_tokenizer, "{}")
    http = TestClient(build_app(engine, ServerArgs(), ["scripted"]))
    chat = {"messages": MESSAGES, "max_tokens": 4}
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
            {"json": schema},
        ),
        ({"structured_outputs": {"regex": "[a-z]+", "disable_any_whitespace": True}}, {"regex": "[a-z]+"}),
        ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
        ({"guided_grammar": 'root ::= "a"'}, {"grammar": 'root ::= "a"'}),
        ({"response_format": {"type": "text"}}, None),
    ]
    for extra, want in cases:
        assert http.post("/v1/chat/completions", json={**chat, **extra}).status_code == 200, extra
        got = engine.params[-1].structured_outputs
        assert (got is None) if want is None else all(getattr(got, k) == v for k, v in want.items()), (
            extra,
            got,
        )
    assert engine.params[-4].structured_outputs.disable_any_whitespace
    resp = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "guided_regex": "[0-9]"})
    assert resp.status_code == 200 and engine.params[-1].structured_outputs.regex == "[0-9]"
    n = len(engine.params)
    post = functools.partial(http.post, "/v1/chat/completions")
    _error(post(json={**chat, "guided_regex": "a", "guided_choice": ["b"]}), "guided_regex", "one")
    _error(post(json={**chat, "response_format": {"type": "json_schema"}}), "response_format", "schema")
    _error(post(json={**chat, "response_format": {"type": "yaml"}}), "response_format", "'yaml'")
    _error(post(json={**chat, "structured_outputs": {"regexp": "a"}}), "structured_outputs", "regexp")
    body = {**chat, "tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}
    _error(post(json=body), "tool_choice", "guided_regex cannot be given")
    named = {"type": "function", "function": {"name": "nope"}}
    _error(post(json={**chat, "tools": TOOLS, "tool_choice": named}), "tool_choice", "'nope'")
    assert len(engine.params) == n  # none of those reached the engine


def test_reasoning_is_split_off_before_tool_calls_are_read(smollm2_tokenizer):
    reply = "<think>\nThe user wants two cities.\n</think>\n\n" + HERMES_REPLY
    engine = ScriptedEngine(smollm2_tokenizer, reply)
    server = dict(enable_auto_tool_choice=True, tool_call_parser="hermes", reasoning_parser="qwen3")
    client = client_for(engine, **server)
    got = client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS)
    message = got.choices[0].message
    assert message.reasoning_content == "The user wants two cities."
    assert message.content == "Checking both.\n" and _calls(message.tool_calls) == WANT
    chunks = list(
        client.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS, stream=True)
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert (
        "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants two cities."
    )
    assert "".join(d.content or "" for d in deltas) == "Checking both.\n"
    assert _calls([tc for d in deltas for tc in d.tool_calls or []]) == WANT
    # Without tools, and a reply that does not think: all content, reasoning_content null.
    engine.reply = "Just an answer."
    message = client.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message
    assert (message.content, message.reasoning_content) == ("Just an answer.", None)
    # A constraint holds only after the thinking, as vLLM does with a reasoning parser.
    client.chat.completions.create(model="scripted", messages=MESSAGES, extra_body={"guided_regex": "[a-z]+"})
    assert (
        engine.params[-1]._grammar_after == smollm2_tokenizer("</think>", add_special_tokens=False).input_ids
    )
    client_for(engine).chat.completions.create(
        model="scripted", messages=MESSAGES, extra_body={"guided_regex": "a"}
    )
    assert engine.params[-1]._grammar_after is None  # no reasoning parser: held from the first token
    # A prompt that closes the think block itself (Qwen3's enable_thinking=False): no thinking follows,
    # so the reply is all content and a constraint holds from its first token, even with deepseek_r1
    # (which otherwise reads a reply as reasoning until </think>).
    r1 = ScriptedEngine(smollm2_tokenizer, "Plain answer.")
    r1_client = client_for(r1, reasoning_parser="deepseek_r1")
    closed = TEMPLATE + "<think>\n\n</think>\n\n"
    got = r1_client.chat.completions.create(
        model="scripted",
        messages=MESSAGES,
        extra_body={"chat_template": closed, "guided_regex": "[A-Za-z .]+"},
    )
    assert (got.choices[0].message.content, got.choices[0].message.reasoning_content) == (
        "Plain answer.",
        None,
    )
    assert r1.params[-1]._grammar_after is None
    got = r1_client.chat.completions.create(model="scripted", messages=MESSAGES)
    assert (got.choices[0].message.content, got.choices[0].message.reasoning_content) == (
        None,
        "Plain answer.",
    )
    with pytest.raises(ValueError, match="unknown reasoning parser 'r2'; there are: qwen3, deepseek_r1"):
        ServerArgs(reasoning_parser="r2")


def _error(resp: httpx.Response, param: str, *needles: str) -> None:
    assert resp.status_code == 400, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and all(n in err["message"] for n in needles), err


def test_requests_the_server_cannot_honour_are_400s(smollm2_tokenizer):
    engine = ScriptedEngine(smollm2_tokenizer, HERMES_REPLY)
    body = {"messages": MESSAGES, "tools": TOOLS}
    plain = TestClient(build_app(engine, ServerArgs(), ["scripted"]))
    _error(plain.post("/v1/chat/completions", json=body), "tools", "--enable-auto-tool-choice", "hermes")
    _error(
        plain.post("/v1/chat/completions", json={**body, "tool_choice": "auto"}),
        "tools",
        "--tool-call-parser",
    )
    tools = TestClient(
        build_app(engine, ServerArgs(enable_auto_tool_choice=True, tool_call_parser="hermes"), ["x"])
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


def test_requests_are_logged_only_when_asked(smollm2_tokenizer, caplog):
    """--enable-log-requests: one INFO line per request with its id, prompt and parameters."""
    engine = ScriptedEngine(smollm2_tokenizer, "Fine.")
    with caplog.at_level("INFO", logger="distgen"):
        client_for(engine).chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=5)
        assert not [r for r in caplog.records if r.getMessage().startswith("request ")]
        logged = client_for(engine, enable_log_requests=True)
        logged.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=5)
        client_for(engine, enable_log_requests=True, disable_log_requests=True).chat.completions.create(
            model="scripted", messages=MESSAGES, max_tokens=5
        )
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert line.startswith("request chatcmpl-") and "Weather in Paris and Rome?" in line
    assert "max_tokens=5" in line


def test_max_log_len_cuts_the_logged_prompt(smollm2_tokenizer, caplog):
    import re

    engine = ScriptedEngine(smollm2_tokenizer, "Fine.")
    with caplog.at_level("INFO", logger="distgen"):
        client = client_for(engine, enable_log_requests=True, max_log_len=5)
        client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=5)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request ")]
    assert re.search(r"prompt tokens '.{5}\.\.\.', ", line), line
    assert "Weather in Paris" not in line


def test_cors_only_for_the_origins_given(smollm2_tokenizer):
    """--allowed-origins: a page from that origin may call the API (its preflight needs no API key);
    other origins, and every origin without the flag, get no CORS headers."""
    engine = ScriptedEngine(smollm2_tokenizer, "Fine.")
    page = "https://ui.example"
    preflight = {"Origin": page, "Access-Control-Request-Method": "POST"}
    chat = {"model": "scripted", "messages": MESSAGES, "max_tokens": 2}
    auth = {"Origin": page, "Authorization": "Bearer k"}

    closed = TestClient(build_app(engine, ServerArgs(chat_template=TEMPLATE, api_key="k"), ["scripted"]))
    resp = closed.post("/v1/chat/completions", json=chat, headers=auth)
    assert resp.status_code == 200 and "access-control-allow-origin" not in resp.headers

    server = ServerArgs(chat_template=TEMPLATE, api_key="k", allowed_origins=[page])
    open_to_page = TestClient(build_app(engine, server, ["scripted"]))
    resp = open_to_page.options("/v1/chat/completions", headers=preflight)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == page
    resp = open_to_page.post("/v1/chat/completions", json=chat, headers=auth)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == page
    assert open_to_page.post("/v1/chat/completions", json=chat, headers={"Origin": page}).status_code == 401
    other = open_to_page.options(
        "/v1/chat/completions", headers={**preflight, "Origin": "https://elsewhere.example"}
    )
    assert "access-control-allow-origin" not in other.headers
