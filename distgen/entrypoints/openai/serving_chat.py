"""``POST /v1/chat/completions``: a conversation rendered with the chat template, n choices."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse

from distgen.entrypoints.chat_utils import render_chat_text, validate_conversation
from distgen.entrypoints.openai.errors import OpenAIError
from distgen.entrypoints.openai.protocol import ChatCompletionRequest
from distgen.entrypoints.openai.reasoning_parsers import (
    REASONING_PARSERS,
    ReasoningParser,
    constrain_after_thinking,
    thinks_first,
)
from distgen.entrypoints.openai.serving_common import (
    ServingContext,
    TokenNamer,
    now,
    sse,
    sse_response,
    start,
    top_entries,
    until_disconnected,
)
from distgen.entrypoints.openai.tool_parsers import (
    PARSERS,
    NamedFunctionParser,
    RequiredToolsParser,
    ToolCall,
    ToolParser,
    required_calls_schema,
)
from distgen.frontend.input_processor import CheckedPrompt
from distgen.outputs import CompletionOutput, RequestOutput
from distgen.sampling_params import SamplingParams, StructuredOutputsParams


@dataclass
class _Choice:
    text: str = ""  # everything the model wrote, tool-call markup included
    num_tokens: int = 0
    started: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict] = field(default_factory=list)
    sent_logprobs: int = 0  # streaming: entries already sent (a delta whose text is held back has some)
    parser: ToolParser | None = None  # with tools: reads calls out of the text
    calls: list[ToolCall] = field(default_factory=list)
    max_calls: int | None = None  # parallel_tool_calls=False: 1 (later calls are dropped)
    reasoning: ReasoningParser | None = None  # with --reasoning-parser: splits off the thinking

    @property
    def openai_finish_reason(self) -> str | None:
        return "tool_calls" if self.calls and self.finish_reason == "stop" else self.finish_reason

    def parse(self, text: str, last: bool) -> dict:
        """The delta that ``text`` (the model's next text) makes: reasoning, content, and calls once
        complete."""
        delta: dict = {}
        if self.reasoning is not None:
            reasoning, text = self.reasoning.feed(text)
            if last:
                more = self.reasoning.finish()
                reasoning, text = reasoning + more[0], text + more[1]
            if reasoning:
                delta["reasoning_content"] = reasoning
        if self.parser is None:
            if text:
                delta["content"] = text
            return delta
        events = self.parser.feed(text) + (self.parser.finish() if last else [])
        content = "".join(e for e in events if isinstance(e, str))
        if content:
            delta["content"] = content
        calls = [e for e in events if isinstance(e, ToolCall)]
        if self.max_calls is not None:
            calls = calls[: max(0, self.max_calls - len(self.calls))]
        if calls:
            delta["tool_calls"] = [c.to_openai(len(self.calls) + i) for i, c in enumerate(calls)]
            self.calls.extend(calls)
        return delta

    def unsent_logprobs(self) -> list[dict]:
        new = self.logprobs[self.sent_logprobs :]
        self.sent_logprobs = len(self.logprobs)
        return new


def tool_mode(
    ctx: ServingContext, req: ChatCompletionRequest
) -> tuple[Callable[[], ToolParser], StructuredOutputsParams | None] | None:
    """How a request's tool calls are read, and the constraint that makes the model write them; None
    when it has no tools or asks for none.

    ``"auto"`` reads the calls the model chooses to write, in its own format, with the server's
    ``--tool-call-parser``. ``"required"`` and a named function constrain the reply to JSON (one or
    more calls, or the named function's arguments), as vLLM does, and need no parser.
    """
    if not req.tools or req.tool_choice == "none":
        return None
    if req.tool_choice in (None, "auto"):
        if ctx.tool_parser is None:
            raise OpenAIError(
                "tool calling needs the server started with --enable-auto-tool-choice and "
                f"--tool-call-parser ({' | '.join(PARSERS)}); send tool_choice='none' to ignore the "
                "tools, or 'required' or a named function",
                param="tools",
            )
        return PARSERS[ctx.tool_parser], None
    given = req.structured_spec()
    if given is not None:
        raise OpenAIError(
            f"a tool_choice other than 'auto' or 'none' constrains the reply already; {given[0]} cannot "
            "be given with it",
            param="tool_choice",
        )
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools]
    if req.tool_choice == "required":
        schema = required_calls_schema(functions, parallel=req.parallel_tool_calls)
        return RequiredToolsParser, StructuredOutputsParams(json=schema)
    name = req.tool_choice.function.get("name")
    fn = next((f for f in functions if f["name"] == name), None)
    if fn is None:
        msg = f"tool_choice names the function {name!r}, which is not in tools"
        raise OpenAIError(msg, param="tool_choice")
    schema = fn.get("parameters") or {"type": "object"}
    return functools.partial(NamedFunctionParser, name), StructuredOutputsParams(json=schema)


async def render_request(
    ctx: ServingContext, req: ChatCompletionRequest, tools: list[dict] | None = None
) -> str:
    """The conversation rendered by its template (on a worker thread: a long conversation renders
    for a while). Its tokens are the input processor's to make (``ServingContext.prepare``), without
    special tokens: the template wrote those."""
    try:
        render = functools.partial(
            render_chat_text,
            ctx.engine.tokenizer,
            validate_conversation(req.messages),
            req.chat_template or ctx.chat_template,
            req.add_generation_prompt,
            req.continue_final_message,
            req.chat_template_kwargs,
            tools,
        )
        return await asyncio.to_thread(render)
    except ValueError as e:
        raise OpenAIError(str(e), param="messages") from e


@dataclass
class _ChatPrompt:
    """The rendered conversation, ready for the engine, and how its reply is read."""

    prompt: CheckedPrompt  # its text and token ids, as the input processor made them
    params: SamplingParams
    parser: Callable[[], ToolParser] | None  # with tools: makes each choice's tool-call parser
    thinking: bool  # with a reasoning parser: the reply opens with its thinking


class _Chat:
    """The request's n choices, as its outputs fold in."""

    def __init__(
        self,
        ctx: ServingContext,
        req: ChatCompletionRequest,
        model: str,
        request_id: str,
        prompt: _ChatPrompt,
    ) -> None:
        self.ctx, self.req = ctx, req
        self.k = prompt.params.logprobs
        self.num_prompt_tokens = len(prompt.prompt.token_ids)
        self.base = {"id": request_id, "created": now(), "model": model}
        reasoning = REASONING_PARSERS[ctx.reasoning_parser] if ctx.reasoning_parser else None
        self.choices = [
            _Choice(
                parser=prompt.parser() if prompt.parser else None,
                max_calls=None if req.parallel_tool_calls else 1,
                reasoning=reasoning(thinking_done=not prompt.thinking) if reasoning else None,
            )
            for _ in range(req.n)
        ]
        # As vLLM: the reply speaks as --response-role, or continues the last message in its role.
        self.role = ctx.response_role if req.add_generation_prompt else str(req.messages[-1].get("role"))
        self.cached = 0  # prompt tokens found in the prefix cache (--enable-prompt-tokens-details)

    def usage(self, completion: int) -> dict:
        return self.ctx.usage(self.num_prompt_tokens, completion, self.cached)

    def fold(self, ch: _Choice, c: CompletionOutput) -> None:
        _fold(ch, c, self.ctx.name_token, self.k)

    def body(self) -> dict:
        """The whole response, once every choice has finished."""
        return {
            **self.base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": i,
                    "message": _message(ch, self.role),
                    "logprobs": {"content": ch.logprobs} if self.k is not None else None,
                    "finish_reason": ch.openai_finish_reason,
                    "stop_reason": ch.stop_reason,
                }
                for i, ch in enumerate(self.choices)
            ],
            "usage": self.usage(sum(ch.num_tokens for ch in self.choices)),
        }


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw: Request):
    model = ctx.check_model(req.model)
    prompt = await _prepare(ctx, req)
    request_id = ctx.new_request_id("chatcmpl")
    gen = start(ctx, req, prompt.prompt, prompt.params, request_id)
    chat = _Chat(ctx, req, model, request_id, prompt)
    if req.stream:
        return sse_response(_stream(chat, gen))
    await until_disconnected(_collect(chat, gen), raw)
    return JSONResponse(chat.body())


async def _prepare(ctx: ServingContext, req: ChatCompletionRequest) -> _ChatPrompt:
    """The conversation rendered, then tokenized, truncated and checked by the input processor, with
    its sampling params and the constraint its tool_choice asks for."""
    engine = ctx.engine
    tools_mode = tool_mode(ctx, req)
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if tools_mode and req.tools else None
    text = await render_request(ctx, req, tools)
    prompt = await ctx.prepare(text, req.truncate_prompt_tokens, add_special_tokens=False, param="messages")
    text = prompt.text
    params = req.to_sampling_params(engine.generation_defaults, len(prompt.token_ids), engine.max_model_len)
    parser, constraint = tools_mode or (None, None)
    if constraint is not None:
        params.structured_outputs = constraint
    # A prompt that ends with a closed think block (thinking turned off) leaves the reply no thinking.
    thinking = ctx.reasoning_parser is not None and thinks_first(text)
    if thinking:
        params = constrain_after_thinking(params, text, ctx.reasoning_end_ids)
    return _ChatPrompt(prompt, params, parser, thinking)


async def _stream(chat: _Chat, gen: AsyncIterator[RequestOutput]) -> AsyncGenerator[str, None]:
    """The chunks: each choice's role first, then its deltas, then usage when the request asks for it."""
    req, k = chat.req, chat.k
    include_usage, continuous = req.stream_options.usage_in() if req.stream_options else (False, False)
    chunk = {**chat.base, "object": "chat.completion.chunk"}
    completion = 0  # tokens so far, all choices

    def so_far() -> dict:
        return {"usage": chat.usage(completion)} if continuous else {}

    async for out in gen:
        chat.cached = max(chat.cached, out.num_cached_tokens)
        for c in out.outputs:
            ch = chat.choices[c.index]
            if ch.finish_reason is not None:
                continue
            if not ch.started:
                ch.started = True
                first = {"index": c.index, "delta": {"role": chat.role, "content": ""}}
                role = {**first, "logprobs": None, "finish_reason": None}
                yield sse({**chunk, "choices": [role], **so_far()})
            before = ch.num_tokens
            chat.fold(ch, c)
            completion += ch.num_tokens - before
            delta = ch.parse(c.text, last=c.finish_reason is not None)
            if not (delta or c.finish_reason):
                continue  # its logprobs go with the next chunk
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": {"content": ch.unsent_logprobs()} if k is not None else None,
                "finish_reason": ch.openai_finish_reason,
                "stop_reason": c.stop_reason,
            }
            yield sse({**chunk, "choices": [choice], **so_far()})
    if include_usage:
        yield sse({**chunk, "choices": [], "usage": chat.usage(completion)})


async def _collect(chat: _Chat, gen: AsyncIterator[RequestOutput]) -> None:
    async for out in gen:
        chat.cached = max(chat.cached, out.num_cached_tokens)
        for c in out.outputs:
            chat.fold(chat.choices[c.index], c)


def _message(ch: _Choice, role: str) -> dict:
    """A whole choice's message: with tool calls, the text around them is the content (None when
    there is none); with a reasoning parser, the thinking is ``reasoning_content`` (and a reply that
    is all thinking has content None)."""
    delta = ch.parse(ch.text, last=True)
    content = delta.get("content", "")
    message: dict = {"role": role, "content": content}
    if ch.calls:
        message["content"] = content if content.strip() else None
        message["tool_calls"] = [c.to_openai() for c in ch.calls]
    if ch.reasoning is not None:
        message["reasoning_content"] = delta.get("reasoning_content") or None
        message["content"] = message["content"] or None  # all thinking, no answer
    return message


def _fold(ch: _Choice, c: CompletionOutput, name: TokenNamer, k: int | None) -> None:
    """Add one delta's text, tokens, finish and logprob entries to the choice."""
    ch.text += c.text
    ch.num_tokens += len(c.token_ids)
    if c.finish_reason is not None:
        ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
    if k is None or c.logprobs is None:
        return
    for tid, entries in zip(c.token_ids, c.logprobs):
        s = name(tid, entries[tid])
        top = [
            {"token": (t := name(i, e)), "logprob": e.logprob, "bytes": list(t.encode())}
            for i, e in top_entries(entries, k)
        ]
        ch.logprobs.append(
            {"token": s, "logprob": entries[tid].logprob, "bytes": list(s.encode()), "top_logprobs": top}
        )
