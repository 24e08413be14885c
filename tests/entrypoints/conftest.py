"""Fixtures shared by the entry points' tests (the server's own are in openai/conftest.py)."""

from __future__ import annotations

import pytest

from tests.entrypoints.openai.conftest import start_server


@pytest.fixture(scope="module")
def greedy_server(tiny_model_dir):
    """A live server on the tiny Llama whose default sampling is greedy
    (``--override-generation-config``), so a client's reply can be compared with the API's."""
    s = start_server(tiny_model_dir("llama"), "--override-generation-config", '{"temperature": 0}')
    yield s
    s.stop()
