"""``POST /v1/responses``: OpenAI's Responses API for text, on the chat path (the input rendered by
the chat template, sampled as a chat completion). ``input`` is a string or a list of messages,
``instructions`` a system message that is not carried to the next turn; ``previous_response_id``
continues a stored response's conversation (responses are kept in memory, the most recent
``MAX_STORED``, unless ``store`` is false). Streaming sends OpenAI's typed events."""

from __future__ import annotations

import json
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from distgen.entrypoints.openai.errors import OpenAIError
from distgen.entrypoints.openai.protocol import ChatCompletionRequest
from distgen.entrypoints.openai.serving_chat import render_request
from distgen.entrypoints.openai.serving_common import (
    ServingContext,
    now,
    start,
    until_disconnected,
)

MAX_STORED = 1024  # responses kept for previous_response_id


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None


class ResponseStore:
    """Each stored response's conversation (its input and output, without its instructions)."""

    def __init__(self, capacity: int = MAX_STORED) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, list[dict[str, str]]] = OrderedDict()

    def get(self, response_id: str) -> list[dict[str, str]]:
        if response_id not in self._items:
            raise OpenAIError(
                f"previous response {response_id!r} not found (not stored, or no longer kept)",
                status=404,
                param="previous_response_id",
            )
        self._items.move_to_end(response_id)
        return self._items[response_id]

    def put(self, response_id: str, conversation: list[dict[str, str]]) -> None:
        self._items[response_id] = conversation
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def _messages(given: str | list[dict[str, Any]]) -> list[dict[str, str]]:
    """The input as chat messages: a string is one user message; a list holds messages whose content
    is a string or text parts (``input_text``, ``output_text``)."""
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    out = []
    for i, item in enumerate(given):
        if item.get("type", "message") != "message" or "role" not in item:
            raise OpenAIError(
                f"input[{i}]: only messages are supported, got {item.get('type')!r}", param="input"
            )
        content = item.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(t, str) for t in parts):
                raise OpenAIError(f"input[{i}].content: only text parts are supported", param="input")
            content = "".join(parts)
        if not isinstance(content, str):
            raise OpenAIError(f"input[{i}].content must be a string or text parts", param="input")
        out.append({"role": str(item["role"]), "content": content})
    return out


async def create_response(ctx: ServingContext, store: ResponseStore, req: ResponsesRequest, raw: Request):
    model = ctx.check_model(req.model)
    engine = ctx.engine
    history = store.get(req.previous_response_id) if req.previous_response_id else []
    conversation = [*history, *_messages(req.input)]
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    chat = ChatCompletionRequest(
        messages=[*system, *conversation],
        max_completion_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
    )
    text = await render_request(ctx, chat)
    prompt = await ctx.prepare(text, None, add_special_tokens=False, param="messages")
    n = len(prompt.token_ids)
    params = chat.to_sampling_params(engine.generation_defaults, n, engine.max_model_len)
    rid = f"resp_{uuid.uuid4().hex}"
    gen = start(ctx, chat, prompt, params, rid)
    state = _Reply(rid, f"msg_{uuid.uuid4().hex}", model, req, n)

    def finish() -> dict:
        if req.store:
            store.put(rid, [*conversation, {"role": "assistant", "content": state.text}])
        return state.body("completed" if state.finish != "length" else "incomplete")

    if req.stream:

        async def events() -> AsyncIterator[str]:
            yield state.event("response.created", response=state.body("in_progress"))
            yield state.event("response.in_progress", response=state.body("in_progress"))
            yield state.event(
                "response.output_item.added", output_index=0, item=state.item("in_progress", "")
            )
            yield state.event("response.content_part.added", **state.where(), part=_part(""))
            try:
                async for out in gen:
                    delta = state.fold(out)
                    if delta:
                        yield state.event("response.output_text.delta", **state.where(), delta=delta)
            except Exception as e:  # the status line is sent: report in the stream
                yield state.event("error", code=type(e).__name__, message=str(e), param=None)
                return
            yield state.event("response.output_text.done", **state.where(), text=state.text)
            yield state.event("response.content_part.done", **state.where(), part=_part(state.text))
            done = finish()
            yield state.event("response.output_item.done", output_index=0, item=done["output"][0])
            yield state.event(f"response.{done['status']}", response=done)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def collect() -> None:
        async for out in gen:
            state.fold(out)

    await until_disconnected(collect(), raw)
    return JSONResponse(finish())


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": []}


class _Reply:
    """One response being built: its text so far and how the objects and events describe it."""

    def __init__(self, rid: str, item_id: str, model: str, req: ResponsesRequest, prompt_tokens: int) -> None:
        self.rid, self.item_id, self.model, self.req = rid, item_id, model, req
        self.prompt_tokens, self.output_tokens, self.cached = prompt_tokens, 0, 0
        self.text, self.finish = "", None
        self.created = now()
        self.seq = 0

    def fold(self, out) -> str:
        c = out.outputs[0]
        self.text += c.text
        self.output_tokens += len(c.token_ids)
        self.cached = max(self.cached, out.num_cached_tokens)
        if c.finish_reason is not None:
            self.finish = c.finish_reason
        return c.text

    def where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def item(self, status: str, text: str) -> dict:
        content = [_part(text)] if status == "completed" or text else []
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def body(self, status: str) -> dict:
        done = status != "in_progress"
        req = self.req
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [self.item("completed", self.text)] if done else [],
            "output_text": self.text if done else "",
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "previous_response_id": req.previous_response_id,
            "store": req.store,
            "metadata": req.metadata or {},
            "parallel_tool_calls": False,
            "tool_choice": "none",
            "tools": [],
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "usage": {
                "input_tokens": self.prompt_tokens,
                "input_tokens_details": {"cached_tokens": self.cached},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.prompt_tokens + self.output_tokens,
            }
            if done
            else None,
        }

    def event(self, kind: str, **fields: Any) -> str:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"
