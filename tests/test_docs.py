"""The configuration reference lists exactly the engine arguments and sampling fields the code has."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from distgen.frontend.args import EngineArgs
from distgen.sampling_params import SamplingParams

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def _table_names(section: str) -> set[str]:
    text = DOC.read_text().split(section, 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+)` \|", text, flags=re.M))


def test_engine_arguments_documented():
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    assert _table_names("## Engine arguments") == fields


def test_sampling_fields_documented():
    fields = {f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_")}
    assert _table_names("## Sampling parameters") == fields
