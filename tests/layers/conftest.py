"""Fixtures shared by the layer tests."""

from __future__ import annotations

import pytest

from tests.layers.model_steps import save_tiny


@pytest.fixture(scope="module")
def tokenizerless_dir(tmp_path_factory):
    """``tokenizerless_dir(arch)`` -> a tiny model of ``arch`` (see :func:`save_tiny`), built once."""
    cache: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in cache:
            cache[arch] = save_tiny(tmp_path_factory, arch)
        return cache[arch]

    return make
