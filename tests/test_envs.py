"""Environment settings: defaults, parsing, and a clear error naming a bad variable."""

from __future__ import annotations

import pytest

from distgen.envs import envs

VARIABLES = ("DISTGEN_ENABLE_MULTIPROCESSING", "DISTGEN_ENGINE_READY_TIMEOUT_S", "DISTGEN_API_KEY")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    e = envs()
    assert e.enable_multiprocessing and e.engine_ready_timeout_s == 600.0 and e.api_key is None


def test_values(monkeypatch):
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "off")
    monkeypatch.setenv("DISTGEN_ENGINE_READY_TIMEOUT_S", "42.5")
    monkeypatch.setenv("DISTGEN_API_KEY", "k")
    e = envs()
    assert not e.enable_multiprocessing and e.engine_ready_timeout_s == 42.5 and e.api_key == "k"
    monkeypatch.setenv("DISTGEN_API_KEY", "")  # set but empty: no key, not a key of ""
    assert envs().api_key is None


@pytest.mark.parametrize("text", ["abc", "0", "-3", "nan"])
def test_a_bad_timeout_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("DISTGEN_ENGINE_READY_TIMEOUT_S", text)
    with pytest.raises(ValueError, match=f"DISTGEN_ENGINE_READY_TIMEOUT_S must be a positive number.*{text}"):
        envs()
