"""``distgen chat`` and ``distgen complete`` against a live server (greedy by the server's default, via
--override-generation-config), and ``distgen collect-env``."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow


def _cli(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "distgen.entrypoints.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_complete_quick_prints_the_servers_completion(greedy_server):
    res = _cli("complete", "--url", greedy_server.v1, "-q", "Once upon a time", "--max-tokens", "8")
    assert res.returncode == 0, res.stderr[-1500:]
    body = {"prompt": "Once upon a time", "max_tokens": 8}
    want = httpx.post(greedy_server.v1 + "/completions", json=body).json()["choices"][0]["text"]
    assert res.stdout == want + "\n"


def test_chat_keeps_the_conversation(greedy_server):
    """Two turns typed on stdin, then Ctrl-D: the second request carries the first exchange."""
    res = _cli(
        "chat",
        "--url",
        greedy_server.v1,
        "--system-prompt",
        "Be brief.",
        "--max-tokens",
        "6",
        stdin="Hi\nAnd?\n",
    )
    assert res.returncode == 0, res.stderr[-1500:]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    url = greedy_server.v1 + "/chat/completions"
    first = httpx.post(url, json={"messages": messages, "max_tokens": 6}).json()["choices"][0]["message"]
    messages += [{"role": "assistant", "content": first["content"]}, {"role": "user", "content": "And?"}]
    second = httpx.post(url, json={"messages": messages, "max_tokens": 6}).json()["choices"][0]["message"]
    assert res.stdout == f"> {first['content']}\n> {second['content']}\n> \n"


def test_a_client_without_a_server_says_so():
    res = _cli("chat", "--url", "http://127.0.0.1:9/v1", "-q", "Hi")
    assert res.returncode != 0
    assert "no server answers at http://127.0.0.1:9/v1" in res.stderr


def test_collect_env_names_the_machine_and_versions():
    import torch

    from distgen.cpu_info import cpu_model_and_flags

    res = _cli("collect-env")
    assert res.returncode == 0, res.stderr[-1500:]
    fields = {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in res.stdout.splitlines()}
    assert fields["torch"] == torch.__version__ and fields["cpu"] == cpu_model_and_flags()[0]
    assert {"python", "os", "transformers", "gpus", "cpu native bfloat16"} <= set(fields)
