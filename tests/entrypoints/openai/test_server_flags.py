"""vLLM's server flags on a live server: HTTPS (--ssl-keyfile/--ssl-certfile), --root-path,
--response-role, --return-tokens-as-token-ids and --enable-prompt-tokens-details."""

from __future__ import annotations

import subprocess

import httpx
import pytest

from tests.entrypoints.openai.conftest import start_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-subj", "/CN=127.0.0.1", "-days", "1"],
        check=True,
        capture_output=True,
    )
    s = start_server(
        tiny_model_dir("llama"),
        *("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--root-path", "/api"),
        *("--response-role", "bot", "--return-tokens-as-token-ids", "--enable-prompt-tokens-details"),
    )
    yield s
    s.stop()


@pytest.fixture
def client():
    with httpx.Client(verify=False, timeout=60) as c:  # the certificate is self-signed
        yield c


def test_https_only(tls_server, client):
    assert tls_server.url.startswith("https://")
    assert client.get(tls_server.url + "/health").status_code == 200
    with pytest.raises(httpx.TransportError):  # plain HTTP is not answered on that port
        httpx.get(tls_server.url.replace("https://", "http://") + "/health", timeout=5)


def test_root_path_is_the_apps_prefix(tls_server, client):
    """Behind a proxy that serves the API under /api and strips it: the routes answer at their own
    paths, and the OpenAPI schema names the prefix clients must use."""
    assert client.get(tls_server.url + "/v1/models").status_code == 200
    assert client.get(tls_server.url + "/openapi.json").json()["servers"] == [{"url": "/api"}]


def test_response_role(tls_server, client):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    reply = client.post(tls_server.v1 + "/chat/completions", json=body).json()
    assert reply["choices"][0]["message"]["role"] == "bot"
    with client.stream("POST", tls_server.v1 + "/chat/completions", json={**body, "stream": True}) as r:
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
    assert '"role":"bot"' in first.replace(" ", "")
    # Continuing the last message: the reply keeps that message's role, as in vLLM.
    cont = {
        **body,
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    }
    reply = client.post(tls_server.v1 + "/chat/completions", json=cont).json()
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_tokens_as_token_ids(tls_server, client):
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 2, "ignore_eos": True}
    lp = client.post(tls_server.v1 + "/completions", json=body).json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == 3 and all(t.startswith("token_id:") for t in lp["tokens"])
    assert all(k.startswith("token_id:") for top in lp["top_logprobs"] for k in top)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "logprobs": True}
    chat["top_logprobs"] = 1
    content = client.post(tls_server.v1 + "/chat/completions", json=chat).json()["choices"][0]["logprobs"]
    assert all(e["token"].startswith("token_id:") for e in content["content"])


def test_prompt_tokens_details_count_prefix_cache_hits(tls_server, client):
    prompt = "The same long prompt, word after word, " * 6  # several KV blocks
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    first = client.post(tls_server.v1 + "/completions", json=body).json()["usage"]
    second = client.post(tls_server.v1 + "/completions", json=body).json()["usage"]
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = second["prompt_tokens_details"]["cached_tokens"]
    assert 16 <= cached < second["prompt_tokens"] and cached % 16 == 0  # whole blocks of 16 tokens
