"""Structured outputs: a request's JSON schema, regex, choice or grammar, compiled for llguidance in
the front end (a bad one is a ValueError there, before anything is queued), then matched on rank 0,
where each step's token mask comes from the tokens the request has so far.

The matchers live on rank 0 (:mod:`distgen.workers.grammar_matchers`), one on each constrained
request's worker state, catching up on the output tokens it has not seen at each step; a preempted
request comes back from scratch and so does its matcher. Reading the tokens on the host is why such a
request is stepped one at a time under async scheduling (``Request.needs_host_tokens``).

llguidance is imported only when a request asks for structured output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from distgen.sampling_params import StructuredOutputsParams

logger = logging.getLogger("distgen")


class GrammarError(ValueError):
    """A structured-output constraint that does not compile."""


def llguidance_module():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # a dependency of the package; a bare environment may lack it
        raise ValueError("structured outputs need the llguidance package: pip install llguidance") from e
    return llguidance


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
    """llguidance's view of the tokenizer (about 0.3 s to build: keep it). Its vocabulary is the
    model's, which may be larger than the tokenizer's."""
    llg = llguidance_module()
    try:
        return llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
    except Exception as e:  # e.g. a slow (Python) tokenizer, which llguidance cannot read
        raise GrammarError(f"structured outputs cannot use this model's tokenizer: {e}") from e


def compile_grammar(params: StructuredOutputsParams, ll_tokenizer) -> str:
    """The llguidance grammar of ``params``; GrammarError (a ValueError) naming what does not compile."""
    llg = llguidance_module()
    if params.json_object or params.json is not None:
        kind = "json"
        schema: Any = {"type": "object"} if params.json_object else params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"structured_outputs.json is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"structured_outputs.json must be a JSON schema object, got {schema!r}")
        if params.disable_any_whitespace:
            extra = {**schema.get("x-guidance", {}), "whitespace_flexible": False}
            schema = {**schema, "x-guidance": extra}
        source = ("json_schema", json.dumps(schema))
    elif params.regex is not None:
        kind, source = "regex", ("regex", params.regex)
    elif params.choice is not None:
        # One terminal of alternatives: the lexer matches it as one automaton. (llguidance's own
        # "choice" format makes each a parser rule, and fails at run time past 2000 of them.)
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in params.choice)
        kind, source = "choice", ("lark", f"start: CHOICE\nCHOICE: {alternatives}")
    else:
        kind, source = "grammar", ("grammar", params.grammar or "")
    try:
        grammar = llg.grammar_from(*source)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"structured_outputs.{kind} does not compile: {e}") from None
    error = llg.LLMatcher.validate_grammar(grammar, ll_tokenizer)
    if error:
        raise GrammarError(f"structured_outputs.{kind} does not compile: {error}")
    return grammar


class GrammarBitmask(NamedTuple):
    """A step's constrained rows and their packed masks (bit ``t`` of a row set: token ``t`` allowed)."""

    rows: list[int]  # the constrained rows' indices in the batch
    packed: torch.Tensor  # [k, ceil(V / 32)] int32, one row per index in ``rows``


def allows_other_than(packed_row: torch.Tensor, ids: set[int]) -> bool:
    """Whether a row's packed mask allows some token outside ``ids``."""
    words = packed_row.numpy()
    allowed = int(np.unpackbits(words.view(np.uint8)).sum())
    inside = sum(1 for t in ids if t < 32 * len(words) and (int(words[t >> 5]) >> (t & 31)) & 1)
    return allowed > inside


def unpack_bitmask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``[k, W]`` int32 bitmask -> ``[k, vocab_size]`` bool (True: allowed), on the mask's device."""
    shifts = torch.arange(32, device=mask.device, dtype=torch.int32)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(mask.shape[0], -1)[:, :vocab_size].bool()
