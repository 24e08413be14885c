"""Structured outputs: a request's JSON schema, regex, choice or grammar, compiled for llguidance in
the front end (a bad one is a ValueError there, before anything is queued), then matched on rank 0,
where each step's token mask comes from the tokens the request has so far.

The matcher of a request lives on its worker state (:class:`~distgen.workers.input_batch.
CachedRequestState`) and catches up on the output tokens it has not seen at each step; a preempted
request comes back from scratch and so does its matcher. Reading the tokens on the host is why such a
request is stepped one at a time under async scheduling (``Request.needs_host_tokens``).

llguidance is imported only when a request asks for structured output.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from distgen.sampling_params import StructuredOutputsParams

if TYPE_CHECKING:
    from distgen.workers.input_batch import CachedRequestState

logger = logging.getLogger("distgen")


class GrammarError(ValueError):
    """A structured-output constraint that does not compile."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # a dependency of the package; a bare environment may lack it
        raise ValueError("structured outputs need the llguidance package: pip install llguidance") from e
    return llguidance


def grammar_tokenizer(tokenizer, vocab_size: int, eos_token_ids: Sequence[int]):
    """llguidance's view of the tokenizer (about 0.3 s to build: keep it). Its vocabulary is the
    model's, which may be larger than the tokenizer's."""
    llg = _llguidance()
    try:
        return llg.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
    except Exception as e:  # e.g. a slow (Python) tokenizer, which llguidance cannot read
        raise GrammarError(f"structured outputs cannot use this model's tokenizer: {e}") from e


def compile_grammar(params: StructuredOutputsParams, ll_tokenizer) -> str:
    """The llguidance grammar of ``params``; GrammarError (a ValueError) naming what does not compile."""
    llg = _llguidance()
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


_NOT_YET = object()


class GrammarMatchers:
    """Rank 0's side: the allowed tokens of each constrained row of a step, as a packed bitmask."""

    def __init__(self, load_tokenizer: Callable[[], Any], vocab_size: int) -> None:
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self._ll_tokenizer = None
        self._executor = None

    def bitmask(self, rows: Sequence[CachedRequestState]) -> GrammarBitmask | None:
        """The constrained rows' indices and their ``[k, ceil(V / 32)]`` int32 bitmask (bit ``t`` of a
        row set: token ``t`` allowed); None when no row is constrained."""
        constrained = [i for i, s in enumerate(rows) if s.sampling_params._grammar is not None]
        if not constrained:
            return None
        llg = _llguidance()
        if self._ll_tokenizer is None:
            eos = rows[constrained[0]].sampling_params._eos_token_ids
            self._ll_tokenizer = grammar_tokenizer(self._load_tokenizer(), self.vocab_size, eos)
            self._executor = llg.LLExecutor()
        mask = torch.zeros((len(constrained), -(-self.vocab_size // 32)), dtype=torch.int32)
        work = []
        for k, i in enumerate(constrained):
            matcher = self._caught_up(rows[i])
            if matcher is _NOT_YET:
                mask[k] = -1  # every bit set: still thinking, not constrained yet
                continue
            if matcher is not None:
                work.append((matcher, k))
                continue
            # The grammar failed: only the request's stop tokens remain, so it ends where its output
            # still fits the grammar (or, with nothing to stop it, goes on unconstrained).
            stops = [t for t in rows[i].sampling_params.all_stop_token_ids if t < self.vocab_size]
            if stops:
                for t in stops:
                    mask[k, t >> 5] |= _bit(t & 31)
            else:
                mask[k] = -1
        if work:  # llguidance fills the rows in parallel, straight into the tensor's memory
            self._executor.unsafe_compute_mask_ptr(work, mask.data_ptr(), mask.shape[1] * 4, len(constrained))
        return GrammarBitmask(rows=constrained, packed=mask)

    def _caught_up(self, s: CachedRequestState):
        """The row's matcher, fed the output tokens it has not seen; None once it has failed (a token it
        did not allow, or a limit of llguidance's reached), with a warning; ``_NOT_YET`` while the
        grammar waits for the end of the model's thinking (``_grammar_after``)."""
        if s.matcher is None:
            after = s.sampling_params._grammar_after
            if after:
                # Until the matcher exists, matcher_consumed is how far the search for the end of the
                # thinking has got (a marker may straddle the last search's end).
                end = end_of(after, s.output_token_ids, max(0, s.matcher_consumed - len(after) + 1))
                if end is None:
                    s.matcher_consumed = len(s.output_token_ids)
                    return _NOT_YET
                s.matcher_consumed = end
            s.matcher = _llguidance().LLMatcher(self._ll_tokenizer, s.sampling_params._grammar)
        new = s.output_token_ids[s.matcher_consumed :]
        if new:
            s.matcher.consume_tokens(new)
            s.matcher_consumed = len(s.output_token_ids)
        if s.matcher.is_error():
            if not s.matcher_failed:
                s.matcher_failed = True
                logger.warning(
                    "request %s left its grammar (%s); it is stopped where it still fits",
                    s.req_id,
                    s.matcher.get_error().splitlines()[0],
                )
            return None
        return s.matcher


def end_of(marker: list[int], tokens: list[int], start: int = 0) -> int | None:
    """The index just past the first ``marker`` in ``tokens`` at or after ``start``; None if none."""
    n = len(marker)
    return next((j + n for j in range(start, len(tokens) - n + 1) if tokens[j : j + n] == marker), None)


def _bit(b: int) -> int:
    """Bit ``b`` of an int32 word, as the signed value torch stores (bit 31 is the sign)."""
    return -(1 << 31) if b == 31 else 1 << b


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
