"""``distgen chat`` and ``distgen complete``: interactive clients of a running server, as ``vllm chat``
and ``vllm complete`` are. Each line typed is sent, the reply streamed back; ``-q`` sends one message
and exits. The conversation of ``chat`` is kept, so each turn sees the ones before."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

DEFAULT_URL = "http://localhost:8000/v1"


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    for name, what in (("chat", "chat completions"), ("complete", "text completions")):
        p = sub.add_parser(
            name,
            help=f"{what} from a running server, interactively (as `vllm {name}`)",
            description=f"Send each line typed to a running server's {what} and stream the reply.",
        )
        p.add_argument("--url", default=DEFAULT_URL, help=f"the server's API base (default: {DEFAULT_URL})")
        p.add_argument("--model-name", dest="model_name", default=None, help="default: the server's first")
        p.add_argument("--api-key", dest="api_key", default=None, help="default: $OPENAI_API_KEY")
        p.add_argument("-q", "--quick", default=None, metavar="MESSAGE", help="send MESSAGE, print, exit")
        p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="tokens per reply")
        if name == "chat":
            p.add_argument("--system-prompt", dest="system_prompt", default=None, help="the first message")


def run_client(ns: argparse.Namespace) -> None:
    import httpx

    key = ns.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=ns.url.rstrip("/"), headers=headers, timeout=600) as client:
        try:
            model = ns.model_name or client.get("/models").raise_for_status().json()["data"][0]["id"]
        except httpx.HTTPError as e:
            raise ConnectionError(f"no server answers at {ns.url}: {e}") from None
        history: list[dict] = []
        if getattr(ns, "system_prompt", None):
            history.append({"role": "system", "content": ns.system_prompt})
        for line in _lines(ns.quick):
            if ns.command == "chat":
                history.append({"role": "user", "content": line})
                reply = _stream(client, "/chat/completions", {"model": model, "messages": history}, ns)
                history.append({"role": "assistant", "content": reply})
            else:
                _stream(client, "/completions", {"model": model, "prompt": line}, ns)


def _lines(quick: str | None) -> Iterator[str]:
    if quick is not None:
        yield quick
        return
    while True:
        try:
            line = input("> ")
        except EOFError:  # Ctrl-D
            print()
            return
        if line.strip():
            yield line


def sse_data(line: str) -> dict | None:
    """The JSON of one server-sent ``data:`` line of a streamed reply; None for any other line and
    for the closing ``[DONE]``."""
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[6:])


def _stream(client, path: str, body: dict, ns: argparse.Namespace) -> str:
    """POST ``body`` streamed; print each delta as it comes; the whole reply."""
    body = {**body, "stream": True}
    if ns.max_tokens is not None:
        body["max_tokens"] = ns.max_tokens
    text = ""
    with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            resp.read()
            raise ValueError(f"the server answered {resp.status_code}: {resp.text[:500]}")
        for raw in resp.iter_lines():
            chunk = sse_data(raw)
            if chunk is None:
                continue
            if "error" in chunk:
                raise ValueError(f"the server ended the reply: {chunk['error'].get('message')}")
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                if delta:
                    text += delta
                    sys.stdout.write(delta)
                    sys.stdout.flush()
    print()
    return text
