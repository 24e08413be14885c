"""Stopping ``distgen serve`` with SIGTERM (as systemd, Kubernetes or a Ray job do) or Ctrl-C: at any
moment, the server exits cleanly and takes its engine core and workers with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from distgen.executor.broadcast import SHUTDOWN_TIMEOUT_S as WORKERS_TIMEOUT_S
from distgen.executor.ports import free_port
from distgen.frontend.core_client import SHUTDOWN_TIMEOUT_S as CORE_TIMEOUT_S
from tests.conftest import wait_gone
from tests.entrypoints.openai.conftest import descendants, start_server

pytestmark = pytest.mark.slow


def start_foreground_job(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` in a process group of its own, as a terminal's foreground job that Ctrl-C reaches
    whole, with SIGINT at its default (not a shell's SIG_IGN for background jobs); stderr piped."""
    return subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def kill_all(proc: subprocess.Popen) -> None:
    """Whatever a failed test left running: the server and every process under it."""
    if proc.poll() is None:
        proc.kill()
    for pid in descendants(proc.pid):
        subprocess.run(["kill", "-9", str(pid)], check=False)


def test_sigterm_while_the_model_loads(tiny_model_dir):
    """Before uvicorn runs, nothing but Python's default handled SIGTERM: the server died at once and
    its engine core and workers lived on until they noticed (after loading the model)."""
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "serve", tiny_model_dir("llama")]
    cmd += ["--port", str(free_port()), "--tp", "2", "--kv-cache-memory", "16MiB", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 60
        while len(kids := descendants(proc.pid)) < 3 and time.monotonic() < deadline:  # core + 2 ranks
            assert proc.poll() is None, f"the server exited with {proc.returncode} during startup"
            time.sleep(0.02)
        assert len(kids) >= 3, "the workers never started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        # The server waited for what it started (the resource tracker may take a moment more).
        assert wait_gone(kids, timeout=2.0) == []
    finally:
        kill_all(proc)


def test_sigterm_while_serving(tiny_model_dir):
    server = start_server(tiny_model_dir("llama"), "--tp", "2")
    kids = descendants(server.proc.pid)
    assert len(kids) >= 3
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(60) == 0
    assert wait_gone(kids, timeout=2.0) == []


@pytest.mark.parametrize("moment", ["core importing", "workers loading"])
def test_ctrl_c_while_starting(moment, tiny_model_dir):
    """Ctrl-C reaches the whole process group. It printed a KeyboardInterrupt traceback from the
    engine core while that imported torch, and the server then waited out the core's shutdown timeout
    (10 s) for a core, and the executor's (5 s) for workers, that read no messages while loading."""
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "serve", tiny_model_dir("llama")]
    cmd += ["--port", str(free_port()), "--tp", "2", "--kv-cache-memory", "16MiB", "--log-level", "warning"]
    proc = start_foreground_job(cmd)
    try:
        want = 1 if moment == "core importing" else 3
        deadline = time.monotonic() + 60
        while len(kids := descendants(proc.pid)) < want and time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited with {proc.returncode} during startup"
            time.sleep(0.01)
        assert len(kids) >= want, f"never saw {moment}"
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        waited = time.monotonic() - t0
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert proc.returncode == 0, err
        assert wait_gone(kids, timeout=2.0) == []
        # Not a speed figure: a stop that waits out either timeout is the bug.
        limit = min(CORE_TIMEOUT_S, WORKERS_TIMEOUT_S)
        assert waited < limit, f"took {waited:.1f}s: waited for a process that was loading"
    finally:
        kill_all(proc)


@pytest.mark.parametrize("shutdown_timeout", [None, "60"], ids=["default", "drain"])
def test_ctrl_c_while_serving_a_stream(shutdown_timeout, tiny_model_dir):
    """Ctrl-C at the terminal reaches every process in the group while a reply streams. uvicorn
    alone waited for the reply to finish however long it took; by default (as vLLM) the request is
    ended at once with an error event, and with --shutdown-timeout it runs to its end. Either way
    the server stops its core and workers, exits 0, and nothing prints a traceback."""
    port = free_port()
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "serve", tiny_model_dir("llama")]
    cmd += ["--port", str(port), "--tp", "2", "--kv-cache-memory", "16MiB", "--log-level", "warning"]
    cmd += ["--shutdown-timeout", shutdown_timeout] if shutdown_timeout else []
    proc = start_foreground_job(cmd)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the server exited with {proc.returncode} during startup"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        kids = descendants(proc.pid)
        assert len(kids) >= 3
        max_tokens = 100 if shutdown_timeout else 1000
        body = {"prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        body["stream_options"] = {"include_usage": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            events = (line.removeprefix("data: ") for line in resp.iter_lines() if line.startswith("data: "))
            assert next(events)  # streaming now
            os.killpg(proc.pid, signal.SIGINT)
            rest = list(events)
        assert rest[-1] == "[DONE]"
        last = json.loads(rest[-2])
        if shutdown_timeout:
            assert last["usage"]["completion_tokens"] == max_tokens, last
            with pytest.raises(httpx.TransportError):  # no new connections meanwhile
                httpx.get(url + "/health", timeout=5)
        else:
            assert last["error"]["message"] == "the server is shutting down" and last["error"]["code"] == 503
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
        assert proc.returncode == 0, err
        assert wait_gone(kids, timeout=2.0) == []
    finally:
        kill_all(proc)
