"""The GPU check's scripts, in their small CPU forms: a lent GPU's few minutes must not be lost to a
script that broke since it last ran (they run nowhere else between GPU sessions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _run(*args: str) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_greedy_check_runs_and_passes():
    out = _run("benchmarks/gpu_greedy.py", "--archs", "llama", "--scenarios", "graphs")
    assert "| llama | graphs | 100% | pass |" in out


def test_benchmark_prints_its_table_with_the_peer():
    out = _run("benchmarks/gpu.py", "--tiny", "--skip-hf-static")
    assert "| engine | batch | out tok/s |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| distgen ", "| HF eager "))]
    assert len(rows) == 5, out  # distgen b1, b4, eager b1; HF eager b1, b4
    assert "equal to HF eager" in out


def test_decode_anatomy_prints_its_breakdown():
    out = _run("benchmarks/decode_anatomy.py", "--tiny", "--steps", "8", "--profiled-steps", "2")
    assert "| decode step, batch 1, prompt 128 |" in out
    assert "| GEMM |" in out and "weight floor" in out
