"""A live ``distgen serve`` on loopback for the server tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from distgen.executor.ports import free_port
from tests.conftest import wait_gone

STARTUP_TIMEOUT_S = 120


def descendants(pid: int) -> list[int]:
    """Processes below ``pid`` (the engine core and its workers)."""
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def descendants_running(pid: int, marker: bytes) -> list[int]:
    """The processes below ``pid`` whose command line holds ``marker``, in pid order."""
    found = []
    for child in descendants(pid):
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if marker in f.read():
                    found.append(child)
        except OSError:
            pass
    return sorted(found)


def metric(server, name: str, label: str = "") -> float:
    """The value of ``name`` in the server's /metrics (the first series whose labels include
    ``label``, if given; 0 while a labelled series has not appeared)."""
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    if label:
        return 0.0  # a labelled series appears with its first count
    raise AssertionError(f"{name} not in /metrics")


@dataclass
class Server:
    proc: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    model_dir: str

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def core_pid(self) -> int:
        for pid in descendants(self.proc.pid):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"distgen.engine_core.main" in f.read():
                        return pid
            except OSError:
                pass
        raise AssertionError("no engine-core process under the server")

    def stop(self) -> None:
        """Ctrl-C, as a user would; then nothing of the server may be left."""
        procs = [self.proc.pid, *descendants(self.proc.pid)]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("the server did not stop within 30 s of Ctrl-C") from None
        left = wait_gone(procs)
        for p in left:
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left after the server stopped: {left}"


def start_server(model_dir: str, *args: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "distgen.entrypoints.cli",
        "serve",
        model_dir,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--kv-cache-memory",
        "16MiB",
        "--log-level",
        "warning",
        *args,
    ]
    proc = subprocess.Popen(cmd, env=None if env is None else {**os.environ, **env})
    scheme = "https" if "--ssl-certfile" in args else "http"
    server = Server(proc, f"{scheme}://127.0.0.1:{port}", model_dir)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited during startup with code {proc.returncode}")
        try:
            if httpx.get(server.url + "/health", timeout=1, verify=False).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise AssertionError(f"the server was not healthy within {STARTUP_TIMEOUT_S} s")


@pytest.fixture(scope="package")
def server(tiny_model_dir) -> Iterator[Server]:
    s = start_server(tiny_model_dir("llama"), "--served-model-name", "tiny-llama")
    yield s
    s.stop()
