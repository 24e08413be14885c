"""``POST /v1/completions``: one or several prompts, n choices each, streamed or not."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from distgen.entrypoints.openai.protocol import CompletionRequest
from distgen.entrypoints.openai.serving_common import (
    ServingContext,
    TokenNamer,
    merge_async_iterators,
    now,
    sse,
    sse_response,
    start,
    top_entries,
    until_disconnected,
)
from distgen.frontend.input_processor import CheckedPrompt
from distgen.outputs import CompletionOutput, Logprob, RequestOutput
from distgen.sampling_params import SamplingParams


@dataclass
class _Logprobs:
    """OpenAI's completion logprobs: parallel lists, one entry per token."""

    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)  # None: a prompt's first token
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, token: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(token)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)


@dataclass
class _Choice:
    text: str = ""  # the echoed prompt, then the completion
    num_tokens: int = 0
    offset: int = 0  # characters of text so far (the completion's text_offset)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt: _Logprobs | None = None  # echo with logprobs: the prompt's, once it is all scored
    completion: _Logprobs = field(default_factory=_Logprobs)
    # Streaming: what went out already.
    sent_text: int = 0
    sent_prompt: bool = False
    sent_tokens: int = 0

    def logprobs(self, stream: bool = False) -> dict:
        """The body: the prompt's entries (echo), then the completion's; ``stream``: only what was
        not sent before, and marks it sent."""
        parts = [] if self.prompt is None or (stream and self.sent_prompt) else [self.prompt]
        start = self.sent_tokens if stream else 0
        if stream:
            self.sent_prompt = self.sent_prompt or self.prompt is not None
            self.sent_tokens = len(self.completion.tokens)
        c = self.completion
        return {
            name: [v for part in parts for v in getattr(part, name)] + getattr(c, name)[start:]
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset")
        }


@dataclass
class _Prompt:
    """One prompt of the request, ready for the engine."""

    prompt: CheckedPrompt  # its text (None: given as token ids) and ids, as the input processor made them
    params: SamplingParams

    @property
    def text(self) -> str | None:
        return self.prompt.text

    @property
    def ids(self) -> list[int]:
        return self.prompt.token_ids


class _Completion:
    """The request's choices, one per (prompt, n), as its outputs fold in."""

    def __init__(
        self, ctx: ServingContext, req: CompletionRequest, model: str, request_id: str, prompts: list[_Prompt]
    ) -> None:
        tokenizer = ctx.engine.tokenizer
        echo = [
            (p.text if p.text is not None else tokenizer.decode(p.ids)) if req.echo else "" for p in prompts
        ]
        self.ctx, self.req = ctx, req
        self.num_prompt_tokens = sum(len(p.ids) for p in prompts)
        self.base = {"id": request_id, "object": "text_completion", "created": now(), "model": model}
        self.choices = {
            (i, j): _Choice(text=echo[i], offset=len(echo[i]))
            for i in range(len(prompts))
            for j in range(req.n)
        }
        self.echo_logprobs = req.echo and req.logprobs is not None
        self.cached = [0] * len(prompts)  # each prompt's tokens found in the prefix cache

    def usage(self, completion: int) -> dict:
        return self.ctx.usage(self.num_prompt_tokens, completion, sum(self.cached))

    def fold(self, ch: _Choice, out: RequestOutput, c: CompletionOutput, i: int) -> None:
        """Add output ``c`` of prompt ``i`` to its choice ``ch``."""
        req, name = self.req, self.ctx.name_token
        self.cached[i] = max(self.cached[i], out.num_cached_tokens)
        plp = out.prompt_logprobs
        # Complete once the prefill is (a chunked prefill's outputs carry it piece by piece).
        if self.echo_logprobs and ch.prompt is None and plp and len(plp) == len(out.prompt_token_ids):
            ch.prompt = _prompt_logprobs(out.prompt_token_ids, plp, name, req.logprobs)
        _fold(ch, c, name, req.logprobs, keep=not req.echo_only)

    def body(self) -> dict:
        """The whole response, once every choice has finished."""
        choices = self.choices
        return {
            **self.base,
            "choices": [
                {
                    "index": i * self.req.n + j,
                    "text": ch.text,
                    "logprobs": ch.logprobs() if self.req.logprobs is not None else None,
                    "finish_reason": ch.finish_reason,
                    "stop_reason": ch.stop_reason,
                }
                for (i, j), ch in sorted(choices.items())
            ],
            "usage": self.usage(sum(ch.num_tokens for ch in choices.values())),
        }


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw: Request):
    model = ctx.check_model(req.model)
    prompts = await _prepare(ctx, req)
    request_id = ctx.new_request_id("cmpl")
    gens = [start(ctx, req, p.prompt, p.params, f"{request_id}-{i}") for i, p in enumerate(prompts)]
    run = _Completion(ctx, req, model, request_id, prompts)
    merged = merge_async_iterators(*gens)
    if req.stream:
        return sse_response(_stream(run, merged))
    await until_disconnected(_collect(run, merged), raw)
    return JSONResponse(run.body())


async def _prepare(ctx: ServingContext, req: CompletionRequest) -> list[_Prompt]:
    """Each prompt tokenized (unless given as ids), truncated and checked by the input processor, with
    its sampling params."""
    engine = ctx.engine
    prompts = []
    for p in req.prompts():
        prompt = await ctx.prepare(p, req.truncate_prompt_tokens)
        params = req.to_sampling_params(
            engine.generation_defaults, len(prompt.token_ids), engine.max_model_len
        )
        prompts.append(_Prompt(prompt, params))
    return prompts


async def _stream(
    run: _Completion, merged: AsyncIterator[tuple[int, RequestOutput]]
) -> AsyncGenerator[str, None]:
    """The chunks: each choice's new text as it comes, then usage when the request asks for it."""
    req = run.req
    include_usage, continuous = req.stream_options.usage_in() if req.stream_options else (False, False)
    completion = 0  # tokens so far, all choices
    async for i, out in merged:
        for c in out.outputs:
            ch = run.choices[(i, c.index)]
            if ch.finish_reason is not None:
                continue
            before = ch.num_tokens
            run.fold(ch, out, c, i)
            completion += ch.num_tokens - before  # an echo-only choice counts none
            if run.echo_logprobs and ch.prompt is None:
                continue  # the echo goes out with its logprobs, once the prompt is scored
            if not (len(ch.text) > ch.sent_text or c.finish_reason):
                continue
            text, ch.sent_text = ch.text[ch.sent_text :], len(ch.text)
            choice = {
                "index": i * req.n + c.index,
                "text": text,
                "logprobs": ch.logprobs(stream=True) if req.logprobs is not None else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            so_far = {"usage": run.usage(completion)} if continuous else {}
            yield sse({**run.base, "choices": [choice], **so_far})
    if include_usage:
        yield sse({**run.base, "choices": [], "usage": run.usage(completion)})


async def _collect(run: _Completion, merged: AsyncIterator[tuple[int, RequestOutput]]) -> None:
    async for i, out in merged:
        for c in out.outputs:
            run.fold(run.choices[(i, c.index)], out, c, i)


def _fold(ch: _Choice, c: CompletionOutput, name: TokenNamer, k: int | None, keep: bool = True) -> None:
    """Add one delta to the choice; ``keep=False`` (echo with max_tokens 0) drops its tokens."""
    if c.finish_reason is not None:
        ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    if not keep:
        return
    ch.text += c.text
    ch.num_tokens += len(c.token_ids)
    if k is None or c.logprobs is None:
        return
    for tid, entries in zip(c.token_ids, c.logprobs):
        s = name(tid, entries[tid])
        top = {name(t, e): e.logprob for t, e in top_entries(entries, k)}
        ch.completion.add(s, entries[tid].logprob, top, ch.offset)
        ch.offset += len(s)


def _prompt_logprobs(
    ids: list[int], prompt_logprobs: list[dict[int, Logprob] | None], name: TokenNamer, k: int
) -> _Logprobs:
    """The echoed prompt's entries (OpenAI's echo with logprobs: the first token has none)."""
    out, offset = _Logprobs(), 0
    for tid, entries in zip(ids, prompt_logprobs):
        if entries is None:
            s = name(tid, None)
            out.add(s, None, None, offset)
        else:
            s = name(tid, entries[tid])
            top = {name(t, e): e.logprob for t, e in top_entries(entries, k)}
            out.add(s, entries[tid].logprob, top, offset)
        offset += len(s)
    return out
