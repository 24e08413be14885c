"""Rank 0's side of structured outputs: the allowed tokens of each constrained row of a step, from a
matcher per request that catches up on the request's output tokens (see :mod:`distgen.structured_output`
for the grammars, compiled in the front end)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from distgen.structured_output import GrammarBitmask, grammar_tokenizer, llguidance_module
from distgen.workers.input_batch import CachedRequestState

logger = logging.getLogger("distgen")


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
        constrained = [i for i, s in enumerate(rows) if s.sampling_params.grammar is not None]
        if not constrained:
            return None
        llg = llguidance_module()
        if self._ll_tokenizer is None:
            eos = rows[constrained[0]].sampling_params.eos_token_ids
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
        grammar waits for the end of the model's thinking (``grammar_after``)."""
        if s.matcher is None:
            after = s.sampling_params.grammar_after
            if after:
                # Until the matcher exists, matcher_consumed is how far the search for the end of the
                # thinking has got (a marker may straddle the last search's end).
                end = end_of(after, s.output_token_ids, max(0, s.matcher_consumed - len(after) + 1))
                if end is None:
                    s.matcher_consumed = len(s.output_token_ids)
                    return _NOT_YET
                s.matcher_consumed = end
            s.matcher = llguidance_module().LLMatcher(self._ll_tokenizer, s.sampling_params.grammar)
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
