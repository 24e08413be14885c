"""Request bodies of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Fields follow OpenAI's names plus vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
ignore_eos, min_tokens, stop_token_ids, ...). Unknown fields are ignored, as OpenAI's SDK may send
newer ones; a known field with a bad type is a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from distgen.entrypoints.openai.errors import OpenAIError
from distgen.frontend.input_processor import sampling_params_with_defaults
from distgen.sampling_params import SamplingParams, StructuredOutputsParams


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: with include_usage, usage so far in every chunk

    def usage_in(self) -> tuple[bool, bool]:
        """(a usage chunk at the end, usage so far in every chunk)."""
        return self.include_usage, self.include_usage and self.continuous_usage_stats


class _SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> [-100, 100]
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    priority: int = 0  # vLLM's: lower first, on a server started with --scheduling-policy priority
    user: str | None = None
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, or its older guided_*.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keep_some(cls, k: int | None) -> int | None:
        if k is not None and k < 1 and k != -1:
            raise ValueError("must be >= 1, or -1 for as many as fit the model's context")
        return k

    def structured(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint the request gives, if any (a 400 for two)."""
        given = self.structured_spec()
        if given is None:
            return None
        field, spec = given
        try:
            return StructuredOutputsParams(**spec)
        except (TypeError, ValueError) as e:
            raise OpenAIError(f"{field}: {e}", param=field) from None

    def structured_spec(self) -> tuple[str, dict[str, Any]] | None:
        """The request field that gives a structured-output constraint, and its StructuredOutputsParams
        fields; None for none."""
        specs: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            if fmt.get("type") == "json_object":
                specs["response_format"] = {"json_object": True}
            elif fmt.get("type") == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise OpenAIError(
                        "response_format json_schema needs json_schema.schema, a JSON schema object",
                        param="response_format",
                    )
                specs["response_format"] = {"json": schema}
            else:
                raise OpenAIError(
                    f"response_format type {fmt.get('type')!r} is not supported: use 'text', 'json_object' "
                    "or 'json_schema'",
                    param="response_format",
                )
        if self.structured_outputs is not None:
            specs["structured_outputs"] = self.structured_outputs
        for kind in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{kind}") is not None:
                specs[f"guided_{kind}"] = {kind: getattr(self, f"guided_{kind}")}
        if len(specs) > 1:
            names = ", ".join(specs)
            raise OpenAIError(f"give one structured-output constraint, not {names}", param=next(iter(specs)))
        return next(iter(specs.items()), None)

    def _sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        defaults: dict[str, Any],
        prompt_len: int,
        limit: int,
    ) -> SamplingParams:
        bias = None
        if self.logit_bias:
            try:
                bias = {int(t): float(b) for t, b in self.logit_bias.items()}
            except ValueError:
                raise OpenAIError("logit_bias keys must be token ids", param="logit_bias") from None
            if any(not -100 <= b <= 100 for b in bias.values()):
                raise OpenAIError("logit_bias values must be in [-100, 100]", param="logit_bias")
        if max_tokens is not None and prompt_len + max_tokens > limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the "
                "completion). Please reduce the length of the prompt or completion.",
                param="max_tokens",
            )
        if max_tokens is None:
            max_tokens = max(limit - prompt_len, 1)
        # The model's generation_config.json fills what the request is silent on (None), as for LLM.
        try:
            return sampling_params_with_defaults(
                defaults,
                n=self.n,
                max_tokens=max_tokens,
                logprobs=logprobs,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos,
                min_tokens=self.min_tokens,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                logit_bias=bias,
                allowed_token_ids=self.allowed_token_ids,
                bad_words=self.bad_words,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
                structured_outputs=self.structured(),
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
            )
        except ValueError as e:
            raise OpenAIError.from_value_error(e) from e


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, p: Any) -> Any:
        """One message for every wrong shape (pydantic's would name one union member: "prompt.str:
        Input should be a valid string" for ``[1.5]``), and no silent ``true`` -> token 1."""

        def token_ids(x: Any) -> bool:
            return isinstance(x, list) and all(type(t) is int for t in x)

        if isinstance(p, str) or token_ids(p):
            return p
        if isinstance(p, list) and (all(isinstance(x, str) for x in p) or all(token_ids(x) for x in p)):
            return p
        raise ValueError("must be a string, a list of strings, a list of token ids, or a list of those")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise OpenAIError("the prompt is empty: give at least one token", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one tokenized prompt
        return list(p)

    def to_sampling_params(self, defaults: dict[str, Any], prompt_len: int, limit: int) -> SamplingParams:
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of is not supported (use n)", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            raise OpenAIError("max_tokens may be 0 only with echo (the prompt alone)", param="max_tokens")
        # max_tokens 0 with echo (how evaluation harnesses score a text): one token is generated, then
        # dropped by the handler (``echo_only``).
        max_tokens = 1 if self.echo_only else self.max_tokens
        params = self._sampling_params(max_tokens, self.logprobs, defaults, prompt_len, limit)
        if self.echo and self.logprobs is not None:
            params.prompt_logprobs = self.logprobs  # the echoed prompt comes with its logprobs
        return params

    @property
    def echo_only(self) -> bool:
        return self.echo and self.max_tokens == 0


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema


class ChatTool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: dict[str, Any]


class ChatCompletionRequest(_SamplingFields):
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = None  # how calls are read: serving_chat.tool_mode
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True  # False: at most one call per reply

    def to_sampling_params(self, defaults: dict[str, Any], prompt_len: int, limit: int) -> SamplingParams:
        if self.top_logprobs and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs=true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(max_tokens, logprobs, defaults, prompt_len, limit)


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]
