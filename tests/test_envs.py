"""Environment settings: defaults, parsing, and a clear error naming a bad variable."""

from __future__ import annotations

import pytest

from distgen.envs import envs

VARIABLES = (
    "DISTGEN_ENABLE_MULTIPROCESSING",
    "DISTGEN_ENGINE_READY_TIMEOUT_S",
    "DISTGEN_API_KEY",
    "DISTGEN_MAX_N_SEQUENCES",
)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    e = envs()
    assert e.enable_multiprocessing and e.engine_ready_timeout_s == 600.0 and e.api_key is None
    assert e.max_n_sequences == 16384


def test_values(monkeypatch):
    monkeypatch.setenv("DISTGEN_ENABLE_MULTIPROCESSING", "off")
    monkeypatch.setenv("DISTGEN_ENGINE_READY_TIMEOUT_S", "42.5")
    monkeypatch.setenv("DISTGEN_API_KEY", "k")
    monkeypatch.setenv("DISTGEN_MAX_N_SEQUENCES", "64")
    e = envs()
    assert e.max_n_sequences == 64
    assert not e.enable_multiprocessing and e.engine_ready_timeout_s == 42.5 and e.api_key == "k"
    monkeypatch.setenv("DISTGEN_API_KEY", "")  # set but empty: no key, not a key of ""
    assert envs().api_key is None


@pytest.mark.parametrize("text", ["abc", "0", "-3", "nan"])
def test_a_bad_timeout_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("DISTGEN_ENGINE_READY_TIMEOUT_S", text)
    with pytest.raises(ValueError, match=f"DISTGEN_ENGINE_READY_TIMEOUT_S must be a positive number.*{text}"):
        envs()


@pytest.mark.parametrize("text", ["abc", "0", "-3", "1.5"])
def test_a_bad_sequence_limit_names_the_variable(monkeypatch, text):
    monkeypatch.setenv("DISTGEN_MAX_N_SEQUENCES", text)
    with pytest.raises(ValueError, match=f"DISTGEN_MAX_N_SEQUENCES must be a positive integer.*{text}"):
        envs()
