"""The server's error table: each bad request gets OpenAI's error shape and status, and the server keeps
serving afterwards."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.entrypoints.openai.conftest import start_server

pytestmark = pytest.mark.slow
OK = {"prompt": "Hello there", "max_tokens": 2, "temperature": 0}


def _assert_error(resp: httpx.Response, status: int, *needles: str, param: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    for needle in needles:
        assert needle in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return err


def _still_serves(server) -> None:
    resp = httpx.post(server.v1 + "/completions", json=OK, timeout=30)
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] != ""


def test_prompt_longer_than_max_model_len(server):
    limit = httpx.get(server.v1 + "/models").json()["data"][0]["max_model_len"]
    resp = httpx.post(server.v1 + "/completions", json={**OK, "prompt": [5] * (limit + 10)})
    err = _assert_error(resp, 400, "maximum context length", str(limit), str(limit + 10))
    assert err["type"] == "BadRequestError"
    # The prompt fits but prompt + max_tokens does not: also 400, naming both parts.
    resp = httpx.post(server.v1 + "/completions", json={**OK, "prompt": [5] * 10, "max_tokens": limit})
    _assert_error(resp, 400, "maximum context length", f"{limit + 10} tokens", "10 in the prompt")
    _still_serves(server)


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("max_tokens", 0),
        ("n", 0),
        ("presence_penalty", 5.0),
        ("top_k", -5),
    ],
)
def test_invalid_sampling_values(server, field, value):
    resp = httpx.post(server.v1 + "/completions", json={**OK, field: value})
    _assert_error(resp, 400, field, param=field)
    _still_serves(server)


def test_empty_prompt(server):
    _assert_error(
        httpx.post(server.v1 + "/completions", json={**OK, "prompt": ""}), 400, "empty", param="prompt"
    )
    _assert_error(
        httpx.post(server.v1 + "/completions", json={**OK, "prompt": []}), 400, "empty", param="prompt"
    )
    resp = httpx.post(server.v1 + "/chat/completions", json={"messages": [], "max_tokens": 2})
    _assert_error(resp, 400, "conversation", param="messages")
    _still_serves(server)


def test_bad_types_and_bodies(server):
    _assert_error(
        httpx.post(server.v1 + "/completions", json={**OK, "max_tokens": "lots"}),
        400,
        "max_tokens",
        param="max_tokens",
    )
    _assert_error(
        httpx.post(server.v1 + "/completions", json={"max_tokens": 2}), 400, "prompt", param="prompt"
    )
    resp = httpx.post(
        server.v1 + "/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    _assert_error(resp, 400)
    resp = httpx.post(server.v1 + "/chat/completions", json={"messages": "hi", "max_tokens": 2})
    _assert_error(resp, 400, "messages", param="messages")
    resp = httpx.post(server.v1 + "/completions", json={**OK, "prompt": [5, 10**9]})
    _assert_error(resp, 400, "vocabulary", param="prompt")
    for prompt in ([1.5], [True], ["a", 1], 5, [[1.0]]):  # not silently token 1, and one message
        resp = httpx.post(server.v1 + "/completions", json={**OK, "prompt": prompt})
        err = _assert_error(resp, 400, "prompt: must be a string, a list of strings", param="prompt")
        assert "Value error" not in err["message"]
    resp = httpx.post(server.v1 + "/completions", json=[1, 2])
    err = _assert_error(resp, 400, "must be a JSON object")
    assert "File" not in err["message"]  # no traceback text
    # Unknown fields are ignored, as OpenAI's newer SDKs may send some.
    assert httpx.post(server.v1 + "/completions", json={**OK, "some_new_field": 1}).status_code == 200
    _still_serves(server)


def test_values_the_engine_could_not_carry_or_would_not_allow(server):
    """A seed beyond 64 bits cannot cross to the engine core; logprobs beyond the engine's
    max_logprobs (20 by default, as vLLM) would make every token's output huge."""
    resp = httpx.post(server.v1 + "/completions", json={**OK, "seed": 2**70})
    _assert_error(resp, 400, "seed", "64-bit", param="seed")
    resp = httpx.post(server.v1 + "/completions", json={**OK, "logprobs": 21})
    _assert_error(resp, 400, "logprobs=21", "max_logprobs", param="logprobs")
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True}
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "top_logprobs": 21})
    _assert_error(resp, 400, "logprobs=21", param="logprobs")
    # Streamed too: the request is checked before the stream starts, so the answer is a 400, not a 200
    # whose stream carries the error.
    resp = httpx.post(server.v1 + "/completions", json={**OK, "logprobs": 21, "stream": True})
    _assert_error(resp, 400, "logprobs=21", param="logprobs")
    assert httpx.post(server.v1 + "/completions", json={**OK, "logprobs": 20}).status_code == 200
    # A tool_choice's constraint is set on the parameters after they are built: still checked, a 400
    # (it reached the engine core, whose decoder refused it, and the client got an empty 200).
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {**chat, "tools": tools, "tool_choice": "required", "allowed_token_ids": [5, 6]}
    resp = httpx.post(server.v1 + "/chat/completions", json=body)
    _assert_error(resp, 400, "allowed_token_ids cannot be combined", param="allowed_token_ids")
    # n in the billions: each sequence is a request of its own (it took the server down).
    resp = httpx.post(server.v1 + "/completions", json={**OK, "n": 10**9})
    _assert_error(resp, 400, "n=1000000000", "DISTGEN_MAX_N_SEQUENCES", param="n")
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "n": 1e9})
    _assert_error(resp, 400, "n=1000000000", param="n")
    # A priority this server (fcfs) would ignore.
    resp = httpx.post(server.v1 + "/completions", json={**OK, "priority": 1})
    _assert_error(resp, 400, "priority=1", "--scheduling-policy priority", param="priority")
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "priority": -2})
    _assert_error(resp, 400, "priority=-2", param="priority")
    assert httpx.post(server.v1 + "/completions", json={**OK, "priority": 0}).status_code == 200
    _still_serves(server)


def test_text_that_is_not_unicode(server):
    """JSON's \\ud800 escape decodes to a lone surrogate, which no tokenizer can encode."""
    bad = json.dumps("Hi \ud800 there")  # the escape, as a client's encoder writes it

    def post(url: str, body: str) -> httpx.Response:
        return httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)

    resp = post(server.v1 + "/completions", f'{{"prompt": {bad}, "max_tokens": 2}}')
    _assert_error(resp, 400, "not valid Unicode", "character 3", param="prompt")
    resp = post(server.v1 + "/completions", f'{{"prompt": ["fine", {bad}], "max_tokens": 2}}')
    _assert_error(resp, 400, "not valid Unicode", param="prompt")
    chat = f'{{"messages": [{{"role": "user", "content": {bad}}}], "max_tokens": 2}}'
    _assert_error(post(server.v1 + "/chat/completions", chat), 400, "not valid Unicode", param="messages")
    _assert_error(post(server.url + "/tokenize", f'{{"prompt": {bad}}}'), 400, "not valid Unicode")
    _still_serves(server)


@pytest.mark.parametrize(
    "message, needle",
    [
        ({"role": "user"}, "could not render"),  # the template reads a content that is not there
        ({"role": "user", "content": None}, "could not render"),
        ({"role": "user", "content": 5}, "'content' must be a string"),
        ({"role": "user", "content": [{"type": "text"}]}, "needs a string 'text'"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "only text"),
    ],
    ids=["no-content", "null-content", "int-content", "text-part-without-text", "image-part"],
)
def test_malformed_chat_messages(server, message, needle):
    resp = httpx.post(server.v1 + "/chat/completions", json={"messages": [message], "max_tokens": 2})
    _assert_error(resp, 400, needle, param="messages")
    _still_serves(server)


def test_features_not_done_fail_instead_of_answering_plain_text(server):
    """A client that sends tools (to a server started without a tool parser) or a response format
    relies on them: silently ignoring them would hand it text it then misreads as a refusal to call a
    tool or as broken output."""
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "tools": tools})
    _assert_error(
        resp, 400, "tool calling needs the server started with --enable-auto-tool-choice", param="tools"
    )
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "tools": tools, "stream": True})
    _assert_error(resp, 400, "tool calling", param="tools")
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "response_format": {"type": "yaml"}})
    _assert_error(resp, 400, "'yaml' is not supported", param="response_format")
    # What needs neither is served.
    ok = {**chat, "tools": tools, "tool_choice": "none", "response_format": {"type": "text"}}
    assert httpx.post(server.v1 + "/chat/completions", json=ok).status_code == 200
    _still_serves(server)


@pytest.mark.parametrize(
    "bias, needle",
    [({"abc": 1}, "keys must be token ids"), ({"5": 101}, "[-100, 100]"), ({"999999": 1}, "vocabulary")],
)
def test_bad_logit_bias(server, bias, needle):
    resp = httpx.post(server.v1 + "/completions", json={**OK, "logit_bias": bias})
    _assert_error(resp, 400, needle, param="logit_bias")
    _still_serves(server)


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("truncate_prompt_tokens", 0, "must be >= 1"),
        ("truncate_prompt_tokens", "all", "integer"),
        ("bad_words", [""], "bad_words must be a list of words"),
        ("bad_words", "darn", "list"),
    ],
)
def test_bad_truncate_prompt_tokens_and_bad_words(server, field, value, needle):
    for path, body in (
        ("/completions", OK),
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
    ):
        resp = httpx.post(server.v1 + path, json={**body, field: value})
        _assert_error(resp, 400, needle, param=field)
    _still_serves(server)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_constraint_that_does_not_compile_is_a_400_naming_its_field(server, stream):
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    resp = httpx.post(server.v1 + "/chat/completions", json={**chat, "response_format": bad_schema})
    _assert_error(resp, 400, "structured_outputs.json does not compile", "objectx", param="response_format")
    resp = httpx.post(server.v1 + "/completions", json={**OK, "stream": stream, "guided_regex": "[a-"})
    _assert_error(resp, 400, "structured_outputs.regex does not compile", param="guided_regex")
    resp = httpx.post(server.v1 + "/completions", json={**OK, "prompt": ["a", "b"], "guided_json": "{no"})
    _assert_error(resp, 400, "not valid JSON", param="guided_json")
    _still_serves(server)


def test_unknown_model_is_404(server):
    resp = httpx.post(server.v1 + "/completions", json={**OK, "model": "gpt-17"})
    _assert_error(resp, 404, "gpt-17", param="model")
    resp = httpx.post(
        server.v1 + "/chat/completions",
        json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
    )
    _assert_error(resp, 404, "nope")
    _assert_error(httpx.get(server.v1 + "/models/gpt-17"), 404, "gpt-17", param="model")
    _still_serves(server)


def test_unknown_endpoints_and_methods_answer_in_openai_shape(server):
    _assert_error(
        httpx.post(server.v1 + "/embeddings", json={"input": "x"}), 404, "no such endpoint: /v1/embeddings"
    )
    _assert_error(httpx.get(server.v1 + "/completions"), 405, "GET is not allowed here")
    _still_serves(server)


def test_streaming_request_errors_before_the_stream(server):
    resp = httpx.post(server.v1 + "/completions", json={**OK, "stream": True, "temperature": -2})
    _assert_error(resp, 400, "temperature")


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir):
    """A server with an API key and a chat template of its own."""
    template = Path(__file__).resolve().parents[3] / "examples" / "template_chatml.jinja"
    s = start_server(tiny_model_dir("qwen2"), "--api-key", "s3cret", "--chat-template", str(template))
    yield s
    s.stop()


def test_api_key(keyed_server):
    url = keyed_server.v1 + "/completions"
    _assert_error(httpx.post(url, json=OK), 401, "API key")
    _assert_error(httpx.post(url, json=OK, headers={"Authorization": "Bearer wrong"}), 401)
    ok = httpx.post(url, json=OK, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # health stays open
    models = httpx.get(keyed_server.v1 + "/models", headers={"Authorization": "Bearer s3cret"})
    assert models.status_code == 200
    # The scheme is case-insensitive (RFC 7235), as vLLM takes it; the key is not.
    for scheme in ("bearer", "BEARER"):
        headers = {"Authorization": f"{scheme} s3cret"}
        assert httpx.get(keyed_server.v1 + "/models", headers=headers).status_code == 200
    for header in ("Basic s3cret", "bearer S3CRET", "s3cret", "Bearers3cret"):
        _assert_error(httpx.get(keyed_server.v1 + "/models", headers={"Authorization": header}), 401)


def test_api_key_from_the_environment(tiny_model_dir):
    """DISTGEN_API_KEY, so the key need not sit on a command line that `ps` shows."""
    s = start_server(tiny_model_dir("llama"), env={"DISTGEN_API_KEY": "from-env"})
    try:
        _assert_error(httpx.post(s.v1 + "/completions", json=OK), 401, "API key")
        ok = httpx.post(s.v1 + "/completions", json=OK, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    finally:
        s.stop()


def test_chat_template_flag(keyed_server):
    """--chat-template replaces the model's template for chat requests (and /tokenize)."""
    messages = [{"role": "user", "content": "Hi there"}]
    toks = httpx.post(keyed_server.url + "/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(keyed_server.url + "/detokenize", json={"tokens": toks}).json()["prompt"]
    assert text == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    headers = {"Authorization": "Bearer s3cret"}
    body = {"messages": messages, "max_tokens": 2, "temperature": 0}
    chat = httpx.post(keyed_server.v1 + "/chat/completions", json=body, headers=headers).json()
    assert chat["usage"]["prompt_tokens"] == len(toks)
