"""The ``distgen`` package: its public names, loaded on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

import distgen


def test_the_public_names_resolve_to_their_homes():
    from distgen.entrypoints.llm import LLM
    from distgen.sampling_params import SamplingParams

    assert distgen.LLM is LLM and distgen.SamplingParams is SamplingParams
    for name in distgen.__all__:
        assert getattr(distgen, name) is not None
        assert name in dir(distgen)
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        distgen.Nope  # noqa: B018


def test_importing_the_package_and_the_command_loads_no_torch():
    """The ``distgen`` command imports torch inside ``main``, where Ctrl-C is caught; an import at
    the top printed a KeyboardInterrupt traceback for a Ctrl-C in its first second or two."""
    code = "import sys, distgen, distgen.entrypoints.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
