"""Every Triton kernel compiles for sm_90 (Hopper) ahead of time, with no GPU here: the interpreter
never runs the real compiler, so without this a kernel could first fail to build on a lent GPU. The
bfloat16 variants must not spill registers (see ``aot_compile.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
SCRIPT = Path(__file__).with_name("aot_compile.py")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="on a GPU the kernel tests compile the kernels themselves"
)
@pytest.mark.skipif(not (BIN / "ptxas").exists(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True, env=env, timeout=600
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("| bf16 |") == 18 and "FAILED" not in proc.stdout
