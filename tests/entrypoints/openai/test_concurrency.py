"""Many concurrent streams with a quarter of the clients hanging up midway (also under async
scheduling with the priority policy), and a dead engine core."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import metric, start_server

pytestmark = pytest.mark.slow
NUM_CLIENTS = 64
MAX_TOKENS = 24


ABORTS = ("distgen:request_success_total", 'finished_reason="abort"')


async def _stream(
    client: httpx.AsyncClient, url: str, prompt: str, hang_up_after: int | None, priority: int = 0
) -> str | None:
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "ignore_eos": True}
    if priority:
        body["priority"] = priority
    text, chunks = "", 0
    async with client.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return text
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            text += chunk["choices"][0]["text"]
            chunks += 1
            if hang_up_after is not None and chunks >= hang_up_after:
                return None  # leaving the block closes the connection mid-stream
    raise AssertionError("the stream ended without [DONE]")


@pytest.fixture(scope="module")
def async_server(tiny_model_dir):
    s = start_server(
        tiny_model_dir("llama"),
        *("--served-model-name", "tiny-llama", "--async-scheduling", "--scheduling-policy", "priority"),
    )
    yield s
    s.stop()


@pytest.mark.parametrize("which", ["server", "async_server"], ids=["default", "async-scheduling"])
def test_concurrent_streams_with_disconnects(which, request):
    """With async scheduling a hung-up client's request is aborted while a step for it is in flight.
    That server schedules by priority (each client a priority of -1, 0 or 1): the order of admission
    and the victims of preemption change, the outputs may not."""
    server = request.getfixturevalue(which)
    url = server.v1 + "/completions"
    aborts = metric(server, *ABORTS)
    prompts = [f"Request number {i} says" for i in range(NUM_CLIENTS)]
    # What each prompt must produce: the same request, alone and not streamed.
    want = {
        p: httpx.post(
            url, json={"prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        ).json()["choices"][0]["text"]
        for p in prompts[:8]
    }

    async def run() -> list[str | None]:
        limits = httpx.Limits(max_connections=NUM_CLIENTS)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(
                *(
                    _stream(client, url, p, 3 if i % 4 == 0 else None, i % 3 - 1 if which != "server" else 0)
                    for i, p in enumerate(prompts)
                )
            )

    results = asyncio.run(run())
    finished = [(p, r) for i, (p, r) in enumerate(zip(prompts, results)) if i % 4 != 0]
    assert all(r is None for i, r in enumerate(results) if i % 4 == 0)
    assert len(finished) == NUM_CLIENTS * 3 // 4 and all(r for _, r in finished)
    for p, r in finished:
        if p in want:
            assert r == want[p], p
    # The aborted requests released their blocks: nothing running, the KV cache back to empty.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
        metric(server, "distgen:kv_cache_usage_perc") != 0.0
        or metric(server, "distgen:num_requests_running") != 0
    ):
        time.sleep(0.2)
    assert metric(server, "distgen:kv_cache_usage_perc") == 0.0
    assert metric(server, "distgen:num_requests_running") == 0.0
    assert metric(server, "distgen:num_requests_waiting") == 0.0
    # Each hung-up stream counts as an abort (unless it finished before the server saw the hang-up).
    assert 1 <= metric(server, *ABORTS) - aborts <= NUM_CLIENTS // 4


@pytest.mark.parametrize("which", ["server", "async_server"], ids=["default", "async-scheduling"])
def test_constrained_and_refused_requests_beside_plain_ones(which, request):
    """Grammar-constrained streams (some hung up), refused grammars and plain requests at once: the
    plain ones get what they get alone, the constrained ones fit, the refused ones are 400s, and
    nothing is left running. Under async scheduling a constrained request makes steps go one at a
    time while it runs."""
    server = request.getfixturevalue(which)
    url = server.v1 + "/completions"
    plain = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    regex = "[a-z]{3,8}( [a-z]{3,8}){2,5}"
    want = {
        i: httpx.post(url, json={"prompt": f"Plain {i}:", **plain}).json()["choices"][0]["text"]
        for i in range(6)
    }

    async def constrained(client: httpx.AsyncClient, i: int) -> str | None:
        body = {
            "prompt": f"Constrained {i}:",
            "max_tokens": 64,
            "temperature": 1.0,
            "seed": i,
            "guided_regex": regex,
        }
        if i % 3 == 0:  # hang up after the first chunk
            async with client.stream("POST", url, json={**body, "stream": True}) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        return None
        resp = await client.post(url, json=body)
        assert resp.status_code == 200, resp.text
        return resp.json()["choices"][0]["text"]

    async def refused(client: httpx.AsyncClient, i: int) -> int:
        resp = await client.post(url, json={"prompt": "x", "stream": i % 2 == 0, "guided_regex": "[a-"})
        return resp.status_code

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(
                *(client.post(url, json={"prompt": f"Plain {i}:", **plain}) for i in range(6)),
                *(constrained(client, i) for i in range(9)),
                *(refused(client, i) for i in range(4)),
            )

    results = asyncio.run(run())
    plains, fitted, codes = results[:6], results[6:15], results[15:]
    assert [r.json()["choices"][0]["text"] for r in plains] == [want[i] for i in range(6)]
    assert all(re.fullmatch(regex, t) for t in fitted if t is not None), fitted
    assert sum(t is None for t in fitted) == 3 and codes == [400] * 4
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "distgen:num_requests_running") != 0:
        time.sleep(0.1)
    assert metric(server, "distgen:num_requests_running") == 0.0
    assert metric(server, "distgen:kv_cache_usage_perc") == 0.0


def test_non_streaming_client_that_hangs_up_is_aborted(server):
    max_tokens = 1000  # far more than can be generated before the client gives up
    before = metric(server, "distgen:generation_tokens_total")
    aborts = metric(server, *ABORTS)
    body = {"prompt": "Long story:", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.v1 + "/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and metric(server, "distgen:num_requests_running") != 0:
        time.sleep(0.1)
    assert metric(server, "distgen:num_requests_running") == 0.0
    assert metric(server, "distgen:kv_cache_usage_perc") == 0.0
    assert metric(server, "distgen:generation_tokens_total") - before < max_tokens  # aborted, not finished
    assert metric(server, *ABORTS) - aborts == 1


def test_engine_core_killed(tiny_model_dir):
    s = start_server(tiny_model_dir("opt"))
    try:
        url = s.v1 + "/completions"
        body = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

        async def in_flight_then_kill() -> httpx.Response:
            async with httpx.AsyncClient(timeout=60) as client:
                task = asyncio.create_task(client.post(url, json=body))
                while metric(s, "distgen:num_requests_running") == 0:  # wait until it is in flight
                    assert not task.done(), task.result().text
                    await asyncio.sleep(0.05)
                os.kill(s.core_pid(), signal.SIGKILL)
                t0 = time.monotonic()
                resp = await task
                assert time.monotonic() - t0 < 10, "the in-flight request hung"
                return resp

        resp = asyncio.run(in_flight_then_kill())
        assert resp.status_code == 503 and "dead" in resp.json()["error"]["message"]
        assert httpx.get(s.url + "/health").status_code == 503
        t0 = time.monotonic()
        again = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert again.status_code == 503 and time.monotonic() - t0 < 5
    finally:
        s.stop()
