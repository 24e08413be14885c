"""Every example under examples/offline_inference runs as written, on the default model, and so does the
self-contained server example (the client example runs against a live server in tests/entrypoints/openai)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "offline_inference").glob("*.py"))
EXAMPLES.append(ROOT / "examples" / "online_serving" / "serve_and_query.py")
EXPECT = {
    "basic.py": "Generated:",
    "greedy.py": "Paris",
    "chat.py": "----",
    "custom_chat_template.py": "<|im_start|>user",
    "beam_search.py": "0: cum_logprob=",
    "tensor_parallel.py": "Paris",
    "structured_outputs.py": "person: Bob, 30",
    "serve_and_query.py": "Assistant: The capital of France is Paris",
}


def test_every_example_has_an_expectation():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


@pytest.mark.slow
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_runs(path):
    res = subprocess.run([sys.executable, str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert EXPECT[path.name] in res.stdout, res.stdout[-2000:]
