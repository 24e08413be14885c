"""``POST /v1/chat/completions``: a conversation rendered with the chat template, n choices."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from distgen.entrypoints.chat_utils import render_chat, validate_conversation
from distgen.entrypoints.openai.errors import OpenAIError
from distgen.entrypoints.openai.protocol import ChatCompletionRequest
from distgen.entrypoints.openai.serving_common import (
    ServingContext,
    check_prompt,
    now,
    sse,
    sse_error,
    token_str,
    top_entries,
    until_disconnected,
    usage,
)
from distgen.outputs import CompletionOutput


@dataclass
class _Choice:
    text: str = ""
    num_tokens: int = 0
    started: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict] = field(default_factory=list)


def render_request(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[str, list[int]]:
    try:
        return render_chat(
            ctx.engine.tokenizer,
            validate_conversation(req.messages),
            req.chat_template or ctx.chat_template,
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
        )
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from e


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    model = ctx.check_model(req.model)
    engine = ctx.engine
    limit = engine.max_model_len
    text, ids = req.truncate(engine.tokenizer, *render_request(ctx, req), limit)
    check_prompt(ids, limit, engine.config.model.vocab_size)
    params = req.to_sampling_params(engine.generation_defaults, len(ids), limit)
    request_id = ctx.new_request_id("chatcmpl")
    gen = engine.generate({"prompt": text, "prompt_token_ids": ids}, params, request_id)
    k = params.logprobs
    base = {"id": request_id, "created": now(), "model": model}
    choices = [_Choice() for _ in range(req.n)]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk = {**base, "object": "chat.completion.chunk"}

        async def stream() -> AsyncIterator[str]:
            try:
                async for out in gen:
                    for c in out.outputs:
                        ch = choices[c.index]
                        if ch.finish_reason is not None:
                            continue
                        if not ch.started:
                            ch.started = True
                            first = {"index": c.index, "delta": {"role": "assistant", "content": ""}}
                            yield sse(
                                {**chunk, "choices": [{**first, "logprobs": None, "finish_reason": None}]}
                            )
                        lps = _fold(ch, c, engine.tokenizer, k)
                        if not (c.text or c.finish_reason):
                            continue
                        choice = {
                            "index": c.index,
                            "delta": {"content": c.text} if c.text else {},
                            "logprobs": {"content": lps} if lps is not None else None,
                            "finish_reason": c.finish_reason,
                            "stop_reason": c.stop_reason,
                        }
                        yield sse({**chunk, "choices": [choice]})
                if include_usage:
                    completion = sum(ch.num_tokens for ch in choices)
                    yield sse({**chunk, "choices": [], "usage": usage(len(ids), completion)})
            except Exception as e:
                yield sse_error(e)
            yield sse("[DONE]")

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def collect() -> None:
        async for out in gen:
            for c in out.outputs:
                _fold(choices[c.index], c, engine.tokenizer, k)

    await until_disconnected(collect(), raw)
    body = {
        **base,
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": ch.text},
                "logprobs": {"content": ch.logprobs} if k is not None else None,
                "finish_reason": ch.finish_reason,
                "stop_reason": ch.stop_reason,
            }
            for i, ch in enumerate(choices)
        ],
        "usage": usage(len(ids), sum(ch.num_tokens for ch in choices)),
    }
    return JSONResponse(body)


def _fold(ch: _Choice, c: CompletionOutput, tokenizer, k: int | None) -> list[dict] | None:
    """Add one delta to the choice; returns the delta's logprob entries (None without logprobs)."""
    ch.text += c.text
    ch.num_tokens += len(c.token_ids)
    if c.finish_reason is not None:
        ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    if k is None or c.logprobs is None:
        return None
    new = []
    for tid, entries in zip(c.token_ids, c.logprobs):
        s = token_str(tokenizer, tid, entries[tid])
        top = [
            {"token": (t := token_str(tokenizer, i, e)), "logprob": e.logprob, "bytes": list(t.encode())}
            for i, e in top_entries(entries, k)
        ]
        new.append(
            {"token": s, "logprob": entries[tid].logprob, "bytes": list(s.encode()), "top_logprobs": top}
        )
    ch.logprobs.extend(new)
    return new
