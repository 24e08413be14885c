"""Front-end side of a request: detokenize, apply stop strings, assemble ``RequestOutput``s.

Each engine-core request is one sequence. A user request with ``n > 1`` fans out into n child
sequences (ids ``"{i}_{request_id}"``) whose outputs are gathered back under the parent here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from distgen.engine_core.messages import EngineCoreOutput, Logprobs
from distgen.frontend.detokenizer import IncrementalDetokenizer
from distgen.frontend.input_processor import NewRequest
from distgen.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from distgen.sampling_params import SamplingParams


@dataclass
class SequenceState:
    child_id: str
    index: int
    params: SamplingParams
    _tokenizer: Any = field(repr=False)
    _prompt_token_ids: list[int] = field(repr=False)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent: int = 0  # token ids already handed out (delta outputs)
    _detok: IncrementalDetokenizer | None = field(default=None, repr=False)

    @property
    def detok(self) -> IncrementalDetokenizer:
        """Made at the sequence's first output, not up front: a request with a large n would otherwise
        build that many detokenizers at once, with the server's event loop blocked meanwhile."""
        if self._detok is None:
            self._detok = IncrementalDetokenizer(self._tokenizer, self._prompt_token_ids, self.params)
        return self._detok


@dataclass
class ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[SequenceState]
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    num_cached_tokens: int = 0
    num_finished: int = 0

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.parents: dict[str, ParentState] = {}
        self.child_to_parent: dict[str, tuple[ParentState, SequenceState]] = {}

    def add_request(self, request_id: str, new: NewRequest, arrival_time: float) -> None:
        prompt, prompt_token_ids, params = new.prompt, new.prompt_token_ids, new.params
        seqs = [
            SequenceState(cid, i, p, self.tokenizer, prompt_token_ids)
            for i, (cid, p) in enumerate(new.children)
        ]
        for s in seqs:
            if s.params.logprobs is not None:
                s.logprobs, s.cumulative_logprob = [], 0.0
        parent = ParentState(request_id, prompt, prompt_token_ids, params, seqs, RequestMetrics(arrival_time))
        if params.prompt_logprobs is not None:
            parent.prompt_logprobs = [None]
        self.parents[request_id] = parent
        for s in seqs:
            self.child_to_parent[s.child_id] = (parent, s)

    def has_unfinished(self) -> bool:
        return bool(self.parents)

    def parents_of(self, child_ids: list[str]) -> list[str]:
        """The user requests these engine-core ids belong to, each once; unknown ids are skipped."""
        found = (self.child_to_parent.get(c) for c in child_ids)
        return list(dict.fromkeys(f[0].request_id for f in found if f is not None))

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a user request; returns its child ids for the engine core to abort."""
        parent = self.parents.pop(request_id, None)
        if parent is None:
            return []
        for s in parent.seqs:
            self.child_to_parent.pop(s.child_id, None)
        return [s.child_id for s in parent.seqs if s.finish_reason is None]

    def process_outputs(
        self, outputs: list[EngineCoreOutput], delta: bool = False
    ) -> tuple[list[RequestOutput], list[str]]:
        """Fold one step's outputs in. Returns (outputs for updated requests, child ids to abort
        because a stop string ended them here)."""
        now = time.time()
        touched: dict[str, ParentState] = {}
        # What each delta output carries: the sequences that changed this step (new tokens, or a
        # finish), by parent, not all n of them (with n in the thousands, a step would cost O(n)
        # per parent, and a request O(n^2)); all unfinished ones when the prompt's logprobs grew.
        changed: dict[str, list[SequenceState]] = {}
        scored: set[str] = set()
        to_abort: list[str] = []
        for out in outputs:
            entry = self.child_to_parent.get(out.request_id)
            if entry is None:
                continue
            parent, seq = entry
            if seq.finish_reason is not None:
                continue
            touched[parent.request_id] = parent
            if out.new_prompt_logprobs is not None and parent.prompt_logprobs is not None and seq.index == 0:
                parent.prompt_logprobs.extend(self._logprob_dicts(out.new_prompt_logprobs))
                scored.add(parent.request_id)
            if out.new_token_ids or out.finish_reason is not None:
                changed.setdefault(parent.request_id, []).append(seq)
            if out.new_token_ids:
                if parent.metrics.first_token_time is None:
                    parent.metrics.first_token_time = now
                    parent.num_cached_tokens = out.num_cached_tokens
                parent.metrics.last_token_time = now
                seq.token_ids.extend(out.new_token_ids)
                if seq.logprobs is not None and out.new_logprobs is not None:
                    for d in self._logprob_dicts(out.new_logprobs):
                        seq.logprobs.append(d)
                    seq.cumulative_logprob += sum(lp[0] for lp in out.new_logprobs.logprobs)
                # The engine ended it on EOS or a stop token id (not on a stop string).
                stop_terminated = out.finish_reason == "stop" and not isinstance(out.stop_reason, str)
                stop_str = seq.detok.update(out.new_token_ids, stop_terminated)
                if stop_str is not None and out.finish_reason is None:
                    seq.finish_reason, seq.stop_reason = "stop", stop_str
                    to_abort.append(seq.child_id)
                    self._finish(parent, seq)
                    continue
            if out.finish_reason is not None:
                seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
                self._finish(parent, seq)
        results = [
            self._make_output(p, delta, changed.get(p.request_id, []), p.request_id in scored)
            for p in touched.values()
        ]
        for p in touched.values():
            if p.finished:
                p.metrics.finished_time = now
                self.parents.pop(p.request_id, None)
        return [r for r in results if r is not None], to_abort

    def _finish(self, parent: ParentState, seq: SequenceState) -> None:
        parent.num_finished += 1
        self.child_to_parent.pop(seq.child_id, None)

    def _logprob_dicts(self, lp: Logprobs) -> list[dict[int, Logprob]]:
        out = []
        for ids, vals, rank in zip(lp.token_ids, lp.logprobs, lp.ranks):
            d: dict[int, Logprob] = {}
            for j, (tid, val) in enumerate(zip(ids, vals)):
                if tid in d:
                    continue
                r = rank if j == 0 else j
                d[tid] = Logprob(val, r, self.tokenizer.decode([tid]))
            out.append(d)
        return out

    def _make_output(
        self, parent: ParentState, delta: bool, changed: list[SequenceState], everyone: bool = False
    ) -> RequestOutput | None:
        """The parent's output: its whole state when it finishes (``delta=False``); else what is new
        since the last one, for the ``changed`` sequences (``everyone``: all but those that finished
        in an earlier step)."""
        if not delta and not parent.finished:
            return None
        if not delta:
            seqs = parent.seqs
        elif everyone:
            now_done = {id(s) for s in changed}
            seqs = [s for s in parent.seqs if s.finish_reason is None or id(s) in now_done]
        elif changed:
            seqs = sorted(changed, key=lambda s: s.index) if len(changed) > 1 else changed
        else:
            return None  # a prefill chunk: nothing to hand out yet
        comps = []
        for s in seqs:
            text = s.detok.get_next_output_text(s.finish_reason is not None, delta)
            start = s.num_sent if delta else 0
            ids, lps = s.token_ids[start:], s.logprobs
            if delta:
                s.num_sent = len(s.token_ids)
                if lps is not None:
                    lps = lps[start:]
            cum, reason = s.cumulative_logprob, s.finish_reason
            comps.append(CompletionOutput(s.index, text, ids, cum, lps, reason, s.stop_reason))
        return RequestOutput(
            parent.request_id,
            parent.prompt,
            parent.prompt_token_ids,
            parent.prompt_logprobs,
            comps,
            parent.finished,
            parent.metrics,
            parent.num_cached_tokens,
        )
