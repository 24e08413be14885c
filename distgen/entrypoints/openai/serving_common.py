"""What the completion and chat handlers share: the served model, prompts in, SSE and logprobs out."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from distgen.engine_core.messages import validate_prompt
from distgen.entrypoints.openai.errors import OpenAIError, error_body
from distgen.entrypoints.openai.reasoning_parsers import end_token_ids
from distgen.exceptions import EngineDeadError
from distgen.frontend.async_llm import AsyncLLM
from distgen.frontend.input_processor import encode_text
from distgen.outputs import Logprob
from distgen.sampling_params import SamplingParams
from distgen.structured_output import GrammarError

T = TypeVar("T")
logger = logging.getLogger("distgen")
# Text at least this long is tokenized on a worker thread: the event loop serves others meanwhile.
OFFLOAD_CHARS = 1 << 15


@dataclass
class ServingContext:
    engine: AsyncLLM
    served_model_names: list[str]
    chat_template: str | None = None
    tool_parser: str | None = None  # a name in tool_parsers.PARSERS: tool_choice "auto" is served
    reasoning_parser: str | None = None  # a name in reasoning_parsers.REASONING_PARSERS
    log_requests: bool = False  # --enable-log-requests
    response_role: str = "assistant"  # the role of a chat reply (--response-role)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N" (--return-tokens-...)
    max_log_len: int | None = None  # characters of a prompt in the request log (None: all of it)
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens

    def name_token(self, tid: int, lp: Logprob | None) -> str:
        """A token as logprobs show it: its text, or ``token_id:N`` (--return-tokens-as-token-ids),
        which survives tokens that are not valid UTF-8 on their own."""
        if self.return_tokens_as_token_ids:
            return f"token_id:{tid}"
        return token_str(self.engine.tokenizer, tid, lp)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
        """The response's usage, with the prefix-cache hits when --enable-prompt-tokens-details."""
        out: dict[str, Any] = usage(prompt_tokens, completion_tokens)
        if self.enable_prompt_tokens_details:
            out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
        return out

    def check_model(self, model: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if model is None or model in self.served_model_names:
            return self.served_model_names[0] if model is None else model
        raise OpenAIError(f"The model `{model}` does not exist.", status=404, param="model")

    @functools.cached_property
    def reasoning_end_ids(self) -> list[int]:
        return end_token_ids(self.engine.tokenizer)

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex}"

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: the longest vocabulary string. Byte-
        level vocabularies spell each byte as one character, and a character is at least one byte."""
        return max(1, max(map(len, self.engine.tokenizer.get_vocab()), default=1))

    def check_prompt_chars(self, chars: int, param: str = "prompt") -> None:
        """400, before any tokenizing, for text too long to fit the context whatever its tokens:
        ``chars`` characters are at least ``chars // max_token_chars`` tokens."""
        limit, longest = self.engine.max_model_len, self.max_token_chars
        if chars // longest >= limit:
            raise OpenAIError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{chars} characters, at least {chars // longest} tokens (no token of this model is "
                f"longer than {longest} characters). Please reduce the length of the prompt.",
                param=param,
            )

    async def encode(
        self, text: str, add_special_tokens: bool = True, truncating: bool = False, param: str = "prompt"
    ) -> list[int]:
        """A text prompt's token ids: checked against the context by its length first (unless it is
        to be truncated to its last tokens), and tokenized off the event loop when it is long."""
        if not truncating:
            self.check_prompt_chars(len(text), param)
        args = (self.engine.tokenizer, text, add_special_tokens, param)
        if len(text) < OFFLOAD_CHARS:
            return encode_prompt(*args)
        return await asyncio.to_thread(encode_prompt, *args)


def now() -> int:
    return int(time.time())


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def sse_error(e: Exception) -> str:
    """``e`` as a stream's last event, with the status it would have had before the stream began."""
    status = e.status if isinstance(e, OpenAIError) else 503 if isinstance(e, EngineDeadError) else 500
    return sse(error_body(str(e), status))


def sse_response(events: AsyncGenerator[str, None]) -> StreamingResponse:
    """``events`` as a server-sent event stream ended by ``[DONE]``. The status line goes out before
    the first event, so an error after it is the stream's last event instead."""

    async def stream() -> AsyncIterator[str]:
        # Closed with the response, so a client that goes away aborts the requests behind ``events``.
        async with contextlib.aclosing(events):
            try:
                async for event in events:
                    yield event
            except Exception as e:
                yield sse_error(e)
        yield sse("[DONE]")

    return StreamingResponse(stream(), media_type="text/event-stream")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def merge_async_iterators(*iterators: AsyncIterator[T]) -> AsyncIterator[tuple[int, T]]:
    """Items of several async iterators as they come, tagged with the iterator's index. Closing the
    merged iterator (or an error in one) cancels the others, so their requests are aborted."""
    if len(iterators) == 1:
        async for item in iterators[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def drain(i: int, it: AsyncIterator[T]) -> None:
        try:
            async for item in it:
                await queue.put((i, item, None, False))
            await queue.put((i, None, None, True))
        except BaseException as e:  # noqa: B036 - forwarded to the consumer
            await queue.put((i, None, e, True))

    tasks = [asyncio.create_task(drain(i, it)) for i, it in enumerate(iterators)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item, err, done = await queue.get()
            if err is not None:
                raise err
            if done:
                remaining -= 1
                continue
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(coro, request: Request):
    """Run ``coro``; cancel it (aborting its requests) if the HTTP client goes away first."""
    work = asyncio.ensure_future(coro)

    async def watch() -> None:
        # The body is read already, so the next ASGI message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise OpenAIError("the client disconnected", status=499)
    finally:
        for task in (work, watcher):
            if not task.done():
                task.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)


def encode_prompt(tokenizer, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
    """A text prompt's token ids; 400 for text that is not valid Unicode."""
    try:
        return encode_text(tokenizer, text, add_special_tokens)
    except ValueError as e:
        raise OpenAIError(str(e), param=param) from e


def start(ctx: ServingContext, req, prompt: dict, params: SamplingParams, request_id: str):
    """``engine.generate`` for one prompt of ``req``; a constraint that does not compile is a 400
    naming the request field that gave it (a chat request's ``tools``, when its tool_choice did)."""
    if ctx.log_requests:
        text, cap = prompt.get("prompt") or "", ctx.max_log_len
        shown = text if cap is None or len(text) <= cap else text[:cap] + "..."
        n = len(prompt["prompt_token_ids"])
        logger.info("request %s: %d prompt tokens %r, %s", request_id, n, shown, params)
    try:
        return ctx.engine.generate(prompt, params, request_id, priority=req.priority)
    except GrammarError as e:
        given = req.structured_spec()
        raise OpenAIError(str(e), param=given[0] if given else "tools") from e


def check_prompt(ids: list[int], limit: int, vocab: int) -> None:
    """400 for a prompt the engine could never run (no room for output, bad ids). Its shape was
    checked with the request (``CompletionRequest._prompt_shape``)."""
    if len(ids) >= limit:
        raise OpenAIError(
            f"This model's maximum context length is {limit} tokens. However, your prompt has "
            f"{len(ids)} tokens, which leaves no room for the completion. Please reduce the length "
            "of the prompt.",
            param="prompt",
        )
    try:
        validate_prompt(ids, limit, vocab)
    except ValueError as e:
        raise OpenAIError(str(e), param="prompt") from e


def top_entries(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely tokens of one position, best first (the sampled one included if it is)."""
    ranked = [(tid, lp) for tid, lp in entries.items() if lp.rank is not None and 1 <= lp.rank <= k]
    return sorted(ranked, key=lambda e: e[1].rank)


def token_str(tokenizer, tid: int, lp: Logprob | None) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])


# How a logprobs entry names its token: (token id, its entry or None) -> the string shown.
TokenNamer = Callable[[int, "Logprob | None"], str]
