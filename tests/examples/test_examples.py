"""Every example under examples/offline_inference runs as written, on the default model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "offline_inference").glob("*.py"))
EXPECT = {
    "basic.py": "Generated:",
    "greedy.py": "Paris",
    "chat.py": "----",
    "custom_chat_template.py": "<|im_start|>user",
    "beam_search.py": "0: cum_logprob=",
    "tensor_parallel.py": "Paris",
}


def test_every_example_has_an_expectation():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    res = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert EXPECT[path.name] in res.stdout, res.stdout[-2000:]
