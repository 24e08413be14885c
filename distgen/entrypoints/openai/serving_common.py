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

from distgen.entrypoints.openai.errors import OpenAIError, error_body
from distgen.entrypoints.openai.reasoning_parsers import end_token_ids
from distgen.exceptions import EngineDeadError, InvalidPromptError
from distgen.frontend.async_llm import AsyncLLM
from distgen.frontend.input_processor import CheckedPrompt, PromptRules, max_token_chars
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
    def prompt_rules(self) -> PromptRules:
        """The input processor's rules for this engine's prompts, text measured before it is
        tokenized: a request can carry megabytes, refused before the tokenizer spends time on them."""
        tokenizer = self.engine.tokenizer
        vocab = self.engine.config.model.vocab_size
        return PromptRules(tokenizer, self.engine.max_model_len, vocab, max_token_chars(tokenizer))

    async def encode(self, text: str, add_special_tokens: bool = True, param: str = "prompt") -> list[int]:
        """A text's token ids (``/tokenize``), unchecked but for its length in characters."""
        rules = self.prompt_rules
        return await _off_loop(len(text), rules.encode, text, add_special_tokens, param)

    async def prepare(
        self,
        prompt: str | list[int],
        truncate_prompt_tokens: int | None,
        add_special_tokens: bool = True,
        param: str = "prompt",
    ) -> CheckedPrompt:
        """A request's prompt tokenized, cut and checked by the input processor's rules; a text prompt
        names ``param`` (a chat's ``messages``) in the errors about its text."""
        chars = len(prompt) if isinstance(prompt, str) else 0
        rules = self.prompt_rules
        return await _off_loop(
            chars, rules.prepare, prompt, truncate_prompt_tokens, add_special_tokens, param
        )


async def _off_loop(chars: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, on a worker thread when it tokenizes ``chars`` characters or more (the event
    loop serves others meanwhile); the input processor's prompt error as a 400."""
    try:
        return fn(*args) if chars < OFFLOAD_CHARS else await asyncio.to_thread(fn, *args)
    except InvalidPromptError as e:
        raise OpenAIError.from_prompt_error(e) from e


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


def top_entries(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The ``k`` most likely tokens of one position, best first (the sampled one included if it is)."""
    ranked = [(tid, lp) for tid, lp in entries.items() if lp.rank is not None and 1 <= lp.rank <= k]
    return sorted(ranked, key=lambda e: e[1].rank)


def token_str(tokenizer, tid: int, lp: Logprob | None) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else tokenizer.decode([tid])


# How a logprobs entry names its token: (token id, its entry or None) -> the string shown.
TokenNamer = Callable[[int, "Logprob | None"], str]
