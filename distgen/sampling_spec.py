"""``SamplingSpec``: a request's sampling as the engine core and the workers act on it.

The user's :class:`~distgen.sampling_params.SamplingParams` stays in the front end (stop strings,
detokenization and n > 1 fan-out are the front end's business). The input processor checks it once,
resolves what only the front end can (the tokenizer's EOS ids, ``bad_words`` as token ids, a compiled
grammar) and sends this frozen Struct instead: decoding it in the engine core and in every worker
validates nothing again, and nothing below the front end writes to it.
"""

from __future__ import annotations

import msgspec

from distgen.sampling_params import SamplingParams, is_greedy_temperature


class SamplingSpec(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's length (the engine core resolves it)
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    stop_token_ids: list[int] = []  # the user's; EOS ids are kept apart (``eos_token_ids``)
    eos_token_ids: list[int] = []  # from the tokenizer and generation_config
    # ``bad_words`` as token sequences: the last token of each is forbidden right after the rest.
    bad_words_token_ids: list[list[int]] = []
    grammar: str | None = None  # structured outputs, compiled for llguidance
    # The grammar holds only after these tokens appear in the output (the end of a reasoning
    # model's thinking, set by a server with a reasoning parser).
    grammar_after: list[int] | None = None

    @classmethod
    def from_params(
        cls,
        params: SamplingParams,
        eos_token_ids: list[int] | None = None,
        bad_words_token_ids: list[list[int]] | None = None,
        grammar: str | None = None,
        grammar_after: list[int] | None = None,
    ) -> SamplingSpec:
        """The spec of an already-checked ``params``, with what the front end resolved for it."""
        p = params
        return cls(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            min_p=p.min_p,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            max_tokens=p.max_tokens,
            min_tokens=p.min_tokens,
            ignore_eos=p.ignore_eos,
            logprobs=p.logprobs,
            prompt_logprobs=p.prompt_logprobs,
            logit_bias=p.logit_bias,
            allowed_token_ids=p.allowed_token_ids,
            stop_token_ids=list(p.stop_token_ids or ()),
            eos_token_ids=list(eos_token_ids or ()),
            bad_words_token_ids=list(bad_words_token_ids or ()),
            grammar=grammar,
            grammar_after=grammar_after,
        )

    @property
    def is_greedy(self) -> bool:
        return is_greedy_temperature(self.temperature)

    @property
    def all_stop_token_ids(self) -> set[int]:
        """Token ids that end the sequence: stop_token_ids, plus EOS unless ignore_eos."""
        ids = set(self.stop_token_ids)
        if not self.ignore_eos:
            ids.update(self.eos_token_ids)
        return ids
