"""Front-end side of a request before the engine core sees it: tokenize, truncate, validate, apply the
generation-config defaults, fan out.

Shared by the synchronous ``LLMEngine`` (``LLM``) and ``AsyncLLM`` (the server). The one owner of
those steps: the OpenAI server renders a chat template and reads its request fields, then hands the
text to ``PromptRules.prepare`` and its fields to ``sampling_params_with_defaults``, and translates the
typed errors they raise (``distgen.exceptions.InvalidPromptError``) into its 400s.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

import msgspec

from distgen.config import EngineConfig
from distgen.engine_core.messages import EngineCoreRequest
from distgen.envs import envs
from distgen.exceptions import InvalidPromptError, PromptTooLongError
from distgen.model_loader.loader import generation_eos_ids, load_generation_config
from distgen.prompt_checks import validate_prompt
from distgen.sampling_params import SamplingParams, StructuredOutputsParams, prompt_limit
from distgen.sampling_spec import SamplingSpec
from distgen.structured_output import compile_grammar, grammar_tokenizer

PromptType = str | dict[str, Any] | list[int]


def encode_text(tokenizer, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    """``text``'s token ids. Text that is not valid Unicode (a lone surrogate, which JSON's
    ``\\ud800`` escape can carry) is an ``InvalidPromptError`` that says so, naming ``param``; the
    tokenizer would raise a TypeError about its input's type."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start : e.end]
        raise InvalidPromptError(
            f"the prompt is not valid Unicode text: {bad!r} at character {e.start} ({e.reason})", param
        ) from None
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def token_id_list(ids: Any) -> list[int]:
    """Prompt token ids as plain ints; a numpy array or torch tensor is read with ``tolist`` (its
    scalars could not cross to the engine core)."""
    if not isinstance(ids, list) and hasattr(ids, "tolist"):
        ids = ids.tolist()
    ids = list(ids)
    bad = next((t for t in ids if type(t) is not int), None)
    if bad is not None:
        raise TypeError(f"prompt_token_ids must be integers, got {bad!r} ({type(bad).__name__})")
    return ids


def keep_last_tokens(
    tokenizer, text: str | None, ids: list[int], keep_last: int | None
) -> tuple[str | None, list[int]]:
    """A prompt cut to its last ``keep_last`` tokens (``truncate_prompt_tokens``); its text, when it
    has one, becomes the text of the tokens kept."""
    if keep_last is None or len(ids) <= keep_last:
        return text, ids
    ids = ids[-keep_last:]
    return (None if text is None else tokenizer.decode(ids)), ids


def max_token_chars(tokenizer) -> int:
    """The most characters of text one token can stand for: the longest vocabulary string. Byte-level
    vocabularies spell each byte as one character, and a character is at least one byte."""
    return max(1, max(map(len, tokenizer.get_vocab()), default=1))


@dataclass(frozen=True)
class PromptRules:
    """What a prompt is checked against: the tokenizer, the engine's ``max_model_len`` and vocabulary,
    and (``token_chars``, the longest token's characters) whether a text is first measured by its
    length, so that text too long whatever its tokens is refused before the tokenizer spends time on it
    (the server's choice: its requests can carry megabytes)."""

    tokenizer: Any
    max_model_len: int
    vocab_size: int
    token_chars: int | None = None

    def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """``text``'s token ids, measured first (with ``token_chars``); ``param`` names the request
        field the text came from in the errors about the text itself."""
        if self.token_chars is not None and len(text) // self.token_chars >= self.max_model_len:
            n = len(text) // self.token_chars
            raise PromptTooLongError(n, self.max_model_len, len(text), self.token_chars, param)
        return encode_text(self.tokenizer, text, add_special_tokens, param)

    def prepare(
        self,
        prompt: PromptType,
        truncate_prompt_tokens: int | None = None,
        add_special_tokens: bool = True,
        param: str = "prompt",
    ) -> CheckedPrompt:
        """``prompt`` tokenized, cut to its last ``truncate_prompt_tokens`` tokens (-1: as many as fit)
        and checked: ``InvalidPromptError`` (``PromptTooLongError``) for one the engine can never run.
        A text to be truncated is not measured first: its length says nothing about what is kept."""
        if isinstance(prompt, CheckedPrompt):
            return prompt
        keep_last = prompt_limit(truncate_prompt_tokens, self.max_model_len)
        rules = self if keep_last is None else dataclasses.replace(self, token_chars=None)
        text, ids = _tokenize(rules, prompt, add_special_tokens, param)
        text, ids = keep_last_tokens(self.tokenizer, text, ids, keep_last)
        validate_prompt(ids, self.max_model_len, self.vocab_size)
        return CheckedPrompt(prompt=text, prompt_token_ids=ids)


class CheckedPrompt(dict):
    """A prompt ``PromptRules.prepare`` tokenized, cut and checked (``{"prompt": text or None,
    "prompt_token_ids": ids}``, a prompt dict like any other): the input processor takes it as it is,
    its ``truncate_prompt_tokens`` already applied. The engine core still guards what it receives."""

    @property
    def text(self) -> str | None:
        return self["prompt"]

    @property
    def token_ids(self) -> list[int]:
        return self["prompt_token_ids"]


def _tokenize(
    rules: PromptRules, prompt: PromptType, add_special_tokens: bool, param: str
) -> tuple[str | None, list[int]]:
    if isinstance(prompt, str):
        return prompt, rules.encode(prompt, add_special_tokens, param)
    if isinstance(prompt, dict):
        text = prompt.get("prompt")
        has_ids = "prompt_token_ids" in prompt
        if "prompt" in prompt and not isinstance(text, str) and not (text is None and has_ids):
            raise TypeError(f"a prompt dict's 'prompt' must be a string, got {type(text).__name__}")
        if has_ids:
            return text, token_id_list(prompt["prompt_token_ids"])
        if "prompt" in prompt:
            return text, rules.encode(text, add_special_tokens, param)
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, (list, tuple)):
        return None, token_id_list(prompt)
    raise TypeError(f"a prompt must be a string, a token-id list or a dict, got {type(prompt).__name__}")


def sampling_params_with_defaults(defaults: dict[str, Any], **given: Any) -> SamplingParams:
    """SamplingParams from ``given`` (None: the request is silent), the model's generation-config
    ``defaults`` (``InputProcessor.generation_defaults``) filling the fields it is silent on. The one
    place those defaults are applied: ``LLM.get_default_sampling_params`` and every server request."""
    return SamplingParams(**{**defaults, **{k: v for k, v in given.items() if v is not None}})


@dataclass
class NewRequest:
    """A request ready for the output processor and the engine core."""

    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams  # the user's, checked
    children: list[tuple[str, SamplingParams]]  # (child id, params): n of them
    core_requests: list[EngineCoreRequest]


def check_priority(priority: object, policy: str) -> None:
    """ValueError for a priority that is not an integer, or one that would be silently ignored."""
    if not isinstance(priority, int) or isinstance(priority, bool) or not -(2**63) <= priority < 2**63:
        raise ValueError(f"priority must be a 64-bit integer, got {priority!r}")
    if priority != 0 and policy != "priority":
        raise ValueError(
            f"priority={priority} needs the priority scheduling policy; this engine schedules "
            f"{policy!r} (start it with scheduling_policy='priority', --scheduling-policy priority)"
        )


class InputProcessor:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.tokenizer = config.model.source.load_tokenizer(config.model.tokenizer)
        model = config.model
        self.generation_defaults = load_generation_config(
            model.source, model.generation_config, model.override_generation_config
        )
        eos = set(generation_eos_ids(config.model.source, config.model.generation_config))
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = sorted(eos)
        self._grammar_tokenizer = None  # llguidance's, built on the first structured request

    def default_sampling_params(self) -> SamplingParams:
        return sampling_params_with_defaults(self.generation_defaults)

    def rules(self, max_model_len: int, token_chars: int | None = None) -> PromptRules:
        """How this engine's prompts are tokenized and checked (``max_model_len``: the engine core's)."""
        return PromptRules(self.tokenizer, max_model_len, self.config.model.vocab_size, token_chars)

    def compile_grammar(self, spec: StructuredOutputsParams) -> str:
        """``spec`` compiled for llguidance; ValueError (nothing queued) for one that does not compile.
        The last few are kept: a completions request's prompts, and clients that send one schema with
        every request, compile it once."""
        return self._compiled(json.dumps(dataclasses.asdict(spec), sort_keys=True))

    @functools.lru_cache(maxsize=64)  # noqa: B019 - one InputProcessor per engine, alive as long
    def _compiled(self, spec_json: str) -> str:
        if self._grammar_tokenizer is None:
            self._grammar_tokenizer = grammar_tokenizer(
                self.tokenizer, self.config.model.vocab_size, self.eos_token_ids
            )
        return compile_grammar(StructuredOutputsParams(**json.loads(spec_json)), self._grammar_tokenizer)

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token sequences: as it reads at the start of a text and after a space
        (most tokenizers spell the two differently), each distinct one once."""
        seqs: list[list[int]] = []
        for word in words:
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = encode_text(self.tokenizer, text, add_special_tokens=False)
                if ids and ids not in seqs:
                    seqs.append(ids)
        return seqs

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival_time: float,
        max_model_len: int,
        max_logprobs: int | None = None,
        priority: int = 0,
    ) -> NewRequest:
        """Tokenize ``prompt`` (cut to ``truncate_prompt_tokens``; a ``CheckedPrompt`` is taken as it
        is), check it and ``params``, and split
        the request into its children: a request with ``n > 1`` becomes n children
        ``"{i}_{request_id}"``, seeded ``seed + i``. Raises ValueError (nothing queued) for a prompt
        that can never run, or for more logprobs than ``max_logprobs`` (default: the engine's; an
        internal caller such as beam search passes what its algorithm needs), or for a ``priority``
        the engine's scheduling policy ignores."""
        check_priority(priority, self.config.scheduler.policy)
        # A checked copy: fields set after construction (the server's constraint for a tool_choice,
        # a user's own edits) are checked here, not found bad by the engine core's decoder.
        params = dataclasses.replace(params)
        checked = self.rules(max_model_len).prepare(prompt, params.truncate_prompt_tokens)
        text, prompt_ids = checked.text, checked.token_ids
        params.verify_token_ids(self.config.model.vocab_size)
        most_n = envs().max_n_sequences
        if params.n > most_n:
            raise ValueError(
                f"SamplingParams.n={params.n} is more than this engine allows ({most_n}); "
                "set DISTGEN_MAX_N_SEQUENCES to allow more"
            )
        limit = self.config.model.max_logprobs if max_logprobs is None else max_logprobs
        vocab = self.config.model.vocab_size
        for name in ("logprobs", "prompt_logprobs"):
            asked = getattr(params, name)
            if asked is not None and asked > limit:
                raise ValueError(
                    f"SamplingParams.{name}={asked} is more than this engine allows ({limit}); "
                    "start it with a larger max_logprobs (--max-logprobs) to ask for more"
                )
            if asked is not None and asked > vocab:  # the engine's cap can be set past it
                raise ValueError(f"SamplingParams.{name}={asked} is more than the vocabulary holds ({vocab})")
        structured = params.structured_outputs
        spec = SamplingSpec.from_params(
            params,
            eos_token_ids=list(self.eos_token_ids),
            bad_words_token_ids=self.bad_words_token_ids(params.bad_words) if params.bad_words else None,
            grammar=None if structured is None else self.compile_grammar(structured),
            grammar_after=params._grammar_after,
        )
        children, reqs = [], []
        for i in range(params.n):
            # Shallow: children only read their params (a deep copy each cost 0.1 ms, 2 s at n=20000).
            child, child_spec = copy.copy(params), spec
            child.n = 1
            if params.seed is not None:  # wrapped into int64, as the seed itself must be
                child.seed = (params.seed + i + 2**63) % 2**64 - 2**63
                child_spec = msgspec.structs.replace(spec, seed=child.seed)
            cid = request_id if params.n == 1 else f"{i}_{request_id}"
            children.append((cid, child))
            reqs.append(EngineCoreRequest(cid, prompt_ids, child_spec, arrival_time, priority))
        return NewRequest(text, prompt_ids, params, children, reqs)
