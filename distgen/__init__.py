"""distgen: a clear, fast LLM inference engine with tensor parallelism and vLLM's API."""

import logging

from distgen.entrypoints.llm import LLM
from distgen.outputs import BeamSearchOutput, CompletionOutput, RequestOutput
from distgen.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
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

logging.getLogger("distgen").addHandler(logging.NullHandler())
