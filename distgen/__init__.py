"""distgen: a clear, fast LLM inference engine with tensor parallelism and vLLM's API.

The names below load on first use (PEP 562), so ``import distgen`` and the ``distgen`` command start
without torch and stay responsive to Ctrl-C while the heavy modules load.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distgen.entrypoints.llm import LLM
    from distgen.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
    from distgen.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
_HOMES = {
    "LLM": "distgen.entrypoints.llm",
    "SamplingParams": "distgen.sampling_params",
    "BeamSearchParams": "distgen.sampling_params",
    "StructuredOutputsParams": "distgen.sampling_params",
    "RequestOutput": "distgen.outputs",
    "CompletionOutput": "distgen.outputs",
    "BeamSearchOutput": "distgen.outputs",
}
__all__ = [
    "LLM",
    "SamplingParams",
    "BeamSearchParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "CompletionOutput",
    "BeamSearchOutput",
    "__version__",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'distgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # once: later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


logging.getLogger("distgen").addHandler(logging.NullHandler())
