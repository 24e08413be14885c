"""A served engine survives a worker's death: streams in flight go on after the worker is replaced
(their text the same as without the kill), /health answers 503 while it is and 200 after, and
/metrics counts the restart. With recovery off and --exit-on-engine-death, the server exits 1."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import wait_gone
from tests.entrypoints.openai.conftest import descendants_running, metric, start_server

pytestmark = pytest.mark.slow
MAX_TOKENS = 48


async def _stream(client: httpx.AsyncClient, url: str, body: dict, first: asyncio.Event) -> list[str]:
    texts: dict[int, str] = {}
    async with client.stream("POST", url, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
            first.set()
    return [texts[i] for i in sorted(texts)]


def test_streams_survive_a_worker_kill(tiny_model_dir):
    s = start_server(tiny_model_dir("llama-gqa3"), "--tp", "3")
    try:
        url = s.v1 + "/completions"
        bodies = [
            {"prompt": f"Story {i}:", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            for i in range(8)
        ]
        bodies.append({"prompt": "Seeded:", "max_tokens": MAX_TOKENS, "seed": 3, "n": 2, "ignore_eos": True})
        want = [[c["text"] for c in httpx.post(url, json=b, timeout=120).json()["choices"]] for b in bodies]
        old = descendants_running(s.core_pid(), b"spawn_main")
        assert len(old) == 3
        health: list[int] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                health.append(httpx.get(s.url + "/health", timeout=10).status_code)
                time.sleep(0.05)

        async def run() -> list[list[str]]:
            first = asyncio.Event()
            async with httpx.AsyncClient(timeout=300) as client:
                tasks = [asyncio.create_task(_stream(client, url, b, first)) for b in bodies]
                await first.wait()
                os.kill(old[1], signal.SIGKILL)
                return await asyncio.gather(*tasks)

        watcher = threading.Thread(target=watch)
        watcher.start()
        t0 = time.monotonic()
        try:
            got = asyncio.run(run())
        finally:
            stop.set()
            watcher.join()
        print(f"nine streams with a worker restart: {time.monotonic() - t0:.1f}s")
        assert got == want
        assert 503 in health and health[-1] == 200  # 503 while the workers were replaced
        assert metric(s, "distgen:num_worker_restarts_total") == 1
        assert metric(s, "distgen:num_recovered_requests_total") >= 1
        assert wait_gone(old, timeout=10) == [] and len(descendants_running(s.core_pid(), b"spawn_main")) == 3
    finally:
        s.stop()


def test_exit_on_engine_death(tiny_model_dir):
    s = start_server(
        tiny_model_dir("llama"), "--tp", "2", "--max-worker-restarts", "0", "--exit-on-engine-death"
    )
    try:
        workers = descendants_running(s.core_pid(), b"spawn_main")
        os.kill(workers[0], signal.SIGKILL)
        body = {"prompt": "Hi", "max_tokens": 4}
        assert httpx.post(s.v1 + "/completions", json=body, timeout=60).status_code == 503
        assert s.proc.wait(30) == 1  # the server exits for its supervisor to restart it
        assert wait_gone(workers, timeout=10) == []
    finally:
        if s.proc.poll() is None:
            s.stop()
