"""The Ray launch scripts end to end on this machine: ``launch/start_head.sh`` brings a one-node
cluster up, ``launch/submit_serve.sh`` submits ``distgen serve --tp 2 --pp 2`` as a Ray job (four
Ray actors on CPUs: two pipeline stages of two tensor-parallel ranks), the server answers a chat
request, and ``ray job stop`` ends it without leaving an engine, a rank or an actor behind.

The cluster uses token authentication with a token made up for this test (``RAY_AUTH_TOKEN``, nothing
written under ``~/.ray``), and free ports for everything Ray would otherwise take at a fixed one.
Needs Ray's job server (``ray[default]``, in the dev extra); skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from distgen.executor.ports import free_port

pytest.importorskip("ray.dashboard.modules.job.sdk", reason="ray[default] (the job server) is not installed")

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 60.0) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _processes(*needles: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if any(n in line for n in needles)]


def _engine_processes() -> list[str]:
    return _processes("distgen serve", "ray::RayWorker")


@pytest.fixture()
def cluster_env():
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed beside this Python")
    if _engine_processes() or _processes("raylet"):
        # The test ends with `ray stop`, which stops every Ray process on the machine.
        pytest.skip("a Ray cluster or a distgen server is already running on this machine")
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_HEAD_IP="127.0.0.1",
        RAY_PORT=str(free_port()),
        RAY_DASHBOARD_PORT=str(free_port()),
    )
    yield env
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def test_submit_serve_as_a_ray_job_then_stop_it(cluster_env, tmp_path):
    from distgen.model_loader.gguf import default_model_path

    env = cluster_env
    ports = ["--num-cpus", "4", "--ray-client-server-port", str(free_port())]
    ports += ["--dashboard-agent-listen-port", str(free_port())]
    head = subprocess.run(
        ["launch/start_head.sh", *ports], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert head.returncode == 0, head.stdout + head.stderr
    assert f"RAY_ADDRESS=http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}" in head.stdout  # the port it was given

    env["RAY_ADDRESS"] = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
    http = free_port()
    log = tmp_path / "submit.log"
    with open(log, "w") as out:
        submit = subprocess.Popen(
            ["launch/submit_serve.sh", default_model_path(), "--tp", "2", "--pp", "2", "--port", str(http)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 240
        while True:
            assert submit.poll() is None, f"the job ended before serving:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no server after 240 s:\n{log.read_text()[-4000:]}"
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        model = _get(f"{base}/v1/models")["data"][0]["id"]
        reply = _post(
            f"{base}/v1/chat/completions",
            {
                "model": model,
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            },
        )
        assert "Paris" in reply["choices"][0]["message"]["content"]
        assert "4 Ray actors on 1 node(s)" in log.read_text()  # the ranks really are Ray actors

        jobs = subprocess.run(
            [str(BIN / "ray"), "job", "list"], env=env, capture_output=True, text=True, timeout=60
        )
        job_ids = set(re.findall(r"raysubmit_[A-Za-z0-9]+", jobs.stdout))
        assert len(job_ids) == 1, jobs.stdout
        stop = subprocess.run(
            [str(BIN / "ray"), "job", "stop", job_ids.pop()],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stop.returncode == 0, stop.stdout + stop.stderr
        submit.wait(timeout=120)
        deadline = time.monotonic() + 60
        while _engine_processes() and time.monotonic() < deadline:
            time.sleep(1)
        assert _engine_processes() == []  # no server, engine core or rank outlives the job
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
