"""``distgen serve -dp 2``: one server over two engine replicas, which outlives the death of one."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.entrypoints.openai.conftest import descendants_running, metric, start_server

pytestmark = pytest.mark.slow


def test_serve_dp2_answers_and_survives_one_replica(tiny_model_dir):
    s = start_server(tiny_model_dir("llama"), "-dp", "2")
    try:
        url = s.v1 + "/completions"
        cores = descendants_running(s.proc.pid, b"distgen.engine_core.main")
        assert len(cores) == 2
        short = {"prompt": ["Hello", "The sky", "One two"], "max_tokens": 4, "temperature": 0}
        r = httpx.post(url, json=short, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"]) == 3

        long = {"prompt": "Hello", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}

        async def two_then_kill() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                tasks = [asyncio.create_task(client.post(url, json=long)) for _ in range(2)]
                # One on each replica: the summed stats count both.
                while metric(s, "distgen:num_requests_running") < 2:
                    assert not any(t.done() for t in tasks)
                    await asyncio.sleep(0.05)
                os.kill(cores[0], signal.SIGKILL)
                return list(await asyncio.gather(*tasks))

        t0 = time.monotonic()
        codes = sorted(resp.status_code for resp in asyncio.run(two_then_kill()))
        assert codes == [200, 503] and time.monotonic() - t0 < 30
        assert httpx.get(s.url + "/health").status_code == 200  # one replica still serves
        again = httpx.post(url, json=short, timeout=30)
        assert again.status_code == 200 and len(again.json()["choices"]) == 3
        assert descendants_running(s.proc.pid, b"distgen.engine_core.main") == cores[1:]
    finally:
        s.stop()  # Ctrl-C: nothing of the server, the live replica or its workers is left
