"""``distgen bench serve|throughput|latency`` with vLLM's flags, metric names and result JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _cli(*argv: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "bench", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bench_serve_measures_a_running_server(greedy_server, tmp_path):
    """On a greedy server, so the streamed text (and where the detokenizer holds back an incomplete
    character, which merges two tokens into one chunk) is the same in every run."""
    res = _cli(
        "serve",
        *("--base-url", greedy_server.url, "--num-prompts", "8"),
        *("--random-input-len", "32", "--random-output-len", "16"),
        *("--max-concurrency", "4", "--ignore-eos", "--save-result", "--result-dir", str(tmp_path)),
        *("--result-filename", "r.json", "--metric-percentiles", "50,99"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Serving Benchmark Result" in res.stdout and "P99 TPOT (ms):" in res.stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert (r["completed"], r["num_prompts"], r["total_output_tokens"], r["total_input_tokens"]) == (
        8,
        8,
        128,
        256,
    )
    assert r["max_concurrency"] == 4 and r["errors"] == [""] * 8 and r["output_lens"] == [16] * 8
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < r[f"median_{name}_ms"] <= r[f"p99_{name}_ms"] and f"p50_{name}_ms" in r
    assert r["output_throughput"] == pytest.approx(128 / r["duration"])
    assert all(len(itl) == 15 for itl in r["itls"])  # one gap between each of 16 streamed tokens


def test_bench_throughput_and_latency_offline(tiny_model_dir):
    model = ("--model", tiny_model_dir("llama"), "--kv-cache-memory", "16MiB")
    res = _cli(
        "throughput", *model, "--num-prompts", "8", "--random-input-len", "16", "--random-output-len", "8"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "requests/s" in res.stdout and "output tokens/s" in res.stdout
    res = _cli(
        "latency", *model, "--batch-size", "2", "--input-len", "8", "--output-len", "4", "--num-iters", "2"
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Avg latency:" in res.stdout and "99% percentile latency:" in res.stdout
