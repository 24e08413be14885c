"""How long Ctrl-C takes to stop ``distgen serve`` while a reply streams, with and without a drain.

Starts the server on the default model (its own process group, as a terminal's foreground job),
streams one completion of ``--max-tokens`` tokens, and sends Ctrl-C to the group after the first
event, twice in one run: with the default ``--shutdown-timeout 0`` (the request is ended at once)
and with ``--shutdown-timeout 600`` (it runs to its end: what every stop did before the flag). The
figures to read: seconds from the signal to the server's exit, and the events the client still got.

    .venv/bin/python benchmarks/shutdown.py
    .venv/bin/python benchmarks/shutdown.py --max-tokens 1000 --tp 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import httpx

from distgen.executor.ports import free_port


def stop_once(args: argparse.Namespace, shutdown_timeout: str) -> tuple[float, int, str, int]:
    """(seconds from Ctrl-C to exit, events after it, the stream's last event, exit status)."""
    port = free_port()
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "serve", "--port", str(port)]
    cmd += ["--tp", str(args.tp), "--log-level", "warning", "--shutdown-timeout", shutdown_timeout]
    proc = subprocess.Popen(
        cmd,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # not a shell's SIG_IGN
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the server exited with {proc.returncode} while starting")
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"prompt": "Hello", "max_tokens": args.max_tokens, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=None) as resp:
            events = (line[6:] for line in resp.iter_lines() if line.startswith("data: "))
            next(events)
            os.killpg(proc.pid, signal.SIGINT)
            start = time.perf_counter()
            rest = list(events)
        code = proc.wait(timeout=900)
        last = json.loads(rest[-2]) if len(rest) > 1 else {}
        end = last["error"]["message"] if "error" in last else last["choices"][0]["finish_reason"]
        return time.perf_counter() - start, len(rest), end, code
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-tokens", type=int, default=400, help="the streamed reply's length")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    args = parser.parse_args()
    print("| --shutdown-timeout | s from Ctrl-C to exit | events after it | stream ended by | exit |")
    print("|---|---|---|---|---|")
    for timeout in ("0", "600"):
        seconds, events, end, code = stop_once(args, timeout)
        print(f"| {timeout} | {seconds:.2f} | {events} | {end} | {code} |")


if __name__ == "__main__":
    main()
