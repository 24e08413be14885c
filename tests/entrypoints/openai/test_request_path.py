"""The server's request path: it renders and reads the request, the front end's input processor tokenizes,
truncates and checks the prompt and applies the model's defaults, and the server only translates the
input processor's errors into OpenAI's 400s. Over an engine that records what reaches ``generate``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from distgen.entrypoints.openai.api_server import ServerArgs, build_app
from distgen.frontend.input_processor import CheckedPrompt
from distgen.outputs import CompletionOutput, RequestOutput

LIMIT = 32
TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }} | {% endfor %}assistant:"


class RecordingEngine:
    """What the handlers use of ``AsyncLLM``; ``generate`` records its prompt and params, answers "ok"."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = LIMIT
        self.config = SimpleNamespace(model=SimpleNamespace(vocab_size=len(tokenizer), model="rec"))
        self.generation_defaults = {"temperature": 0.25, "top_k": 7, "max_tokens": 3}
        self.errored = False
        self.stat_loggers: list = []
        self.calls: list = []  # (prompt, params) per generate

    def shutdown(self) -> None:
        pass

    async def generate(self, prompt, params, request_id, priority: int = 0) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt, params))
        outs = [CompletionOutput(0, "ok", [5], None, None, "stop")]
        yield RequestOutput(request_id, prompt["prompt"], prompt["prompt_token_ids"], None, outs, True)


@pytest.fixture
def app(smollm2_tokenizer):
    engine = RecordingEngine(smollm2_tokenizer)
    client = TestClient(build_app(engine, ServerArgs(chat_template=TEMPLATE), ["rec"]))
    return engine, client


def _error(resp) -> dict:
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


def test_an_over_long_prompt_is_openais_400(app):
    _, client = app
    err = _error(client.post("/v1/completions", json={"prompt": [5] * (LIMIT + 3)}))
    assert err["message"] == (
        f"This model's maximum context length is {LIMIT} tokens. However, your prompt has {LIMIT + 3} "
        "tokens, which leaves no room for the completion. Please reduce the length of the prompt."
    )
    assert err["param"] == "prompt"
    chat = {"messages": [{"role": "user", "content": "word " * LIMIT}]}
    err = _error(client.post("/v1/chat/completions", json=chat))
    assert err["message"].startswith(f"This model's maximum context length is {LIMIT} tokens. However, your")
    assert "which leaves no room for the completion" in err["message"] and err["param"] == "prompt"
    # Text too long whatever its tokens: refused by its characters, naming the field it came from.
    chat = {"messages": [{"role": "user", "content": "x" * 100_000}]}
    err = _error(client.post("/v1/chat/completions", json=chat))
    assert "characters, at least" in err["message"] and err["param"] == "messages"
    err = _error(client.post("/v1/completions", json={"prompt": [5, 10**9]}))
    assert "out of the vocabulary" in err["message"] and err["param"] == "prompt"


def test_generate_gets_the_prompt_the_input_processor_prepared(app, smollm2_tokenizer):
    engine, client = app
    body = {"prompt": list(range(100, 160)), "truncate_prompt_tokens": 4, "max_tokens": 1}
    assert client.post("/v1/completions", json=body).status_code == 200
    prompt, params = engine.calls[-1]
    assert isinstance(prompt, CheckedPrompt) and prompt.token_ids == list(range(156, 160))
    chat = {"messages": [{"role": "user", "content": "hi " * 40}], "truncate_prompt_tokens": 5}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    prompt, _ = engine.calls[-1]
    assert isinstance(prompt, CheckedPrompt) and len(prompt.token_ids) == 5
    assert prompt.text == smollm2_tokenizer.decode(prompt.token_ids) and prompt.text.endswith("assistant:")


def test_the_models_defaults_fill_what_the_request_leaves_out(app):
    engine, client = app
    assert client.post("/v1/completions", json={"prompt": "Hi", "top_k": 3}).status_code == 200
    params = engine.calls[-1][1]
    # The model's temperature where the request is silent; the request's own top_k, and its max_tokens
    # (16, the API's default) rather than the model's.
    assert (params.temperature, params.top_k, params.max_tokens) == (0.25, 3, 16)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 0.9}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    params = engine.calls[-1][1]
    prompt_len = len(engine.calls[-1][0].token_ids)
    assert (params.temperature, params.top_k, params.max_tokens) == (0.9, 7, LIMIT - prompt_len)
