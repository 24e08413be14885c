"""Sampling parameters, named and validated as vLLM names and validates them."""

from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass, field
from typing import Any

_GREEDY_EPS = 1e-5


_FLOATS = ("presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "min_p")
_INTS = ("n", "top_k", "min_tokens")
_OPTIONAL_INTS = ("seed", "max_tokens", "logprobs", "prompt_logprobs", "truncate_prompt_tokens")
_BOOLS = (
    "ignore_eos",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
)


def _plain(v: Any, kind: type) -> Any:
    """``v`` as a plain ``int``/``float`` when it is a number of that kind (numpy's scalars too,
    which could not cross to the engine core); anything else unchanged, for the checks to name."""
    if isinstance(v, bool):
        return v
    if kind is int and isinstance(v, numbers.Integral):
        return int(v)
    if kind is float and isinstance(v, numbers.Real):
        return float(v)
    return v


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """A real number that is not NaN (True is not a temperature)."""
    return (isinstance(v, float) and v == v) or _is_int(v)


def prompt_limit(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many of a prompt's last tokens ``truncate_prompt_tokens`` keeps: -1 means as many as the
    model's context holds with room for one generated token, None all of them."""
    return max_model_len - 1 if truncate_prompt_tokens == -1 else truncate_prompt_tokens


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, a regular expression, one of some strings, or a grammar
    (Lark, or llama.cpp's GBNF): vLLM's names. Give exactly one. ``disable_any_whitespace`` makes JSON
    compact (no whitespace a model could loop on)."""

    json: str | dict | None = None  # a JSON schema (text or decoded)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None  # any JSON object
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                "StructuredOutputsParams takes exactly one of json, regex, choice, grammar, json_object; "
                f"got {', '.join(given) or 'none'}"
            )
        kinds = {"json": (str, dict), "regex": str, "grammar": str, "json_object": bool}
        for name, kind in kinds.items():
            if getattr(self, name) is not None and not isinstance(getattr(self, name), kind):
                raise ValueError(
                    f"StructuredOutputsParams.{name} has the wrong type, got {getattr(self, name)!r}"
                )
        if self.choice is not None and (
            not isinstance(self.choice, (list, tuple))
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise ValueError(
                f"StructuredOutputsParams.choice must be a list of non-empty strings, got {self.choice!r}"
            )
        if self.choice is not None:
            self.choice = list(self.choice)


def is_greedy_temperature(temperature: float) -> bool:
    return temperature < _GREEDY_EPS


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Field names and defaults follow vLLM's ``SamplingParams``. Invalid values raise
    ``ValueError`` naming the field at construction.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling
    allowed_token_ids: list[int] | None = None  # only these may be sampled
    bad_words: list[str] | None = None  # words never generated (each as its tokens, see below)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens (-1: all that fit)
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, grammar
    # Set by a server with a reasoning parser: the grammar holds only after these tokens (the end of
    # the model's thinking, "</think>") appear in the output. The front end's own: the input processor
    # carries it into the request's ``SamplingSpec``.
    _grammar_after: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"SamplingParams.stop must be a string or a list of strings, got {self.stop!r}.")
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple)):
            self.stop_token_ids = list(self.stop_token_ids)
        else:
            raise ValueError(
                f"SamplingParams.stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}."
            )
        if self.top_k is None:
            self.top_k = 0
        for name in _FLOATS:
            setattr(self, name, _plain(getattr(self, name), float))
        for name in _INTS + _OPTIONAL_INTS:
            setattr(self, name, _plain(getattr(self, name), int))
        self.stop_token_ids = [_plain(t, int) for t in self.stop_token_ids]
        if isinstance(self.logit_bias, dict):
            self.logit_bias = {_plain(t, int): _plain(b, float) for t, b in self.logit_bias.items()} or None
        if isinstance(self.allowed_token_ids, (list, tuple)):
            self.allowed_token_ids = [_plain(t, int) for t in self.allowed_token_ids]
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as e:  # an unknown key
                raise ValueError(f"SamplingParams.structured_outputs: {e}") from None
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        elif isinstance(self.bad_words, tuple):
            self.bad_words = list(self.bad_words)
        self._verify()
        if self.is_greedy:
            # Greedy ignores the truncation knobs, as in vLLM.
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    # -- validation -------------------------------------------------------------------------
    def _verify(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}.")

        for name in _FLOATS:
            if not _is_number(getattr(self, name)):
                raise bad(name, "must be a number")
        for name in _INTS:
            if not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer")
        for name in _OPTIONAL_INTS:
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise bad(name, "must be an integer or None")
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
        if self.n < 1:
            raise bad("n", "must be >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if self.temperature < 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if self.top_k < 0 and self.top_k != -1:
            raise bad("top_k", "must be 0 or -1 (disabled) or at least 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise bad("seed", "must be a 64-bit signed integer or None")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad("max_tokens", "must be >= 1 or None")
        if self.min_tokens < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise bad(name, "must be >= 0 or None")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise bad("stop", "must hold non-empty strings")
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or any(
                not _is_int(t) or t < 0 or not _is_number(b) or abs(b) == float("inf")
                for t, b in self.logit_bias.items()
            )
        ):
            raise bad("logit_bias", "must map token ids to finite numbers")
        if self.allowed_token_ids is not None and (
            not isinstance(self.allowed_token_ids, list)
            or not self.allowed_token_ids
            or any(not _is_int(t) or t < 0 for t in self.allowed_token_ids)
        ):
            raise bad("allowed_token_ids", "must be a non-empty list of token ids")
        if any(not _is_int(t) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must hold non-negative integers")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list)
            or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            raise bad("bad_words", "must be a list of words (non-blank strings)")
        if self.structured_outputs is not None and not isinstance(
            self.structured_outputs, StructuredOutputsParams
        ):
            raise bad("structured_outputs", "must be a StructuredOutputsParams (or a dict of its fields)")
        if self.structured_outputs is not None and self.allowed_token_ids is not None:
            # Two masks that may leave no token at all: the grammar alone says what may come next.
            raise bad(
                "allowed_token_ids",
                "cannot be combined with structured_outputs (write the restriction into the grammar)",
            )
        if self.truncate_prompt_tokens is not None and (
            self.truncate_prompt_tokens < 1 and self.truncate_prompt_tokens != -1
        ):
            raise bad("truncate_prompt_tokens", "must be >= 1, -1 (as many as fit the model) or None")

    # -- derived ------------------------------------------------------------------------------
    def verify_token_ids(self, vocab_size: int) -> None:
        """Raise ValueError for a ``logit_bias`` or ``allowed_token_ids`` id the model does not have
        (it would index past the logits on the device)."""
        for name, ids in (
            ("logit_bias", self.logit_bias or ()),
            ("allowed_token_ids", self.allowed_token_ids or ()),
        ):
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(
                    f"SamplingParams.{name} holds token id {bad}, out of the vocabulary range "
                    f"[0, {vocab_size})"
                )

    def prompt_limit(self, max_model_len: int) -> int | None:
        """How many of the prompt's last tokens to keep (``truncate_prompt_tokens``); None: all."""
        return prompt_limit(self.truncate_prompt_tokens, max_model_len)

    @property
    def is_greedy(self) -> bool:
        return is_greedy_temperature(self.temperature)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)

    @classmethod
    def from_optional(cls, **kwargs: Any) -> SamplingParams:
        """Build from keyword arguments, dropping the ones that are None (OpenAI-style input)."""
        return cls(**{k: v for k, v in kwargs.items() if v is not None})


@dataclass
class BeamSearchParams:
    """Beam search parameters, as vLLM's ``BeamSearchParams``."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"BeamSearchParams.{name} {why}, got {getattr(self, name)!r}.")

        kinds = {"beam_width": int, "max_tokens": int, "temperature": float, "length_penalty": float}
        for name, kind in kinds.items():
            setattr(self, name, _plain(getattr(self, name), kind))
        for name in ("beam_width", "max_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "must be an integer >= 1")
        for name in ("temperature", "length_penalty"):
            if not _is_number(getattr(self, name)):
                raise bad(name, "must be a number")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be True or False")
