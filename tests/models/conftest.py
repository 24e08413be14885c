"""The model tests check numerics (greedy tokens against transformers), not process plumbing: their
engine core runs in the test process, which saves about 2 s per engine start. The engine-core process
itself is tested in tests/frontend, tests/engine_core and tests/entrypoints."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _engine_core_in_process(monkeypatch):
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "0")
