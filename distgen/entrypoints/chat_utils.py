"""Chat templates: load one from a path or a string, and render a conversation into a prompt."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import TemplateError

Message = dict[str, Any]
Conversation = list[Message]


def load_chat_template(chat_template: str | Path | None) -> str | None:
    """A Jinja chat template from a file path, or the template string itself; None stays None."""
    if chat_template is None:
        return None
    text = str(chat_template)
    if os.path.isfile(text):
        return Path(text).read_text()
    if any(c in text for c in "{}\n"):
        return text  # a literal template
    raise ValueError(f"chat template {text!r} is neither an existing file nor a Jinja template string")


def _flatten_content(i: int, message: Message) -> Message:
    """OpenAI-style content parts ``[{"type": "text", "text": ...}, ...]`` -> one string."""
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got {part!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}: a text content part needs a string 'text', got {part!r}")
            texts.append(part["text"])
        message = {**message, "content": "\n".join(texts)}
    elif content is not None and not isinstance(content, str):
        raise ValueError(
            f"message {i}: 'content' must be a string or a list of text parts, got {type(content).__name__}"
        )
    return message


def _arguments_as_objects(message: Message) -> Message:
    """An assistant message's earlier tool calls with their arguments decoded: OpenAI sends them as
    JSON text, and chat templates write them with ``tojson`` (text would come out quoted twice)."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return message
    decoded = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
            try:
                args = json.loads(fn["arguments"])
            except json.JSONDecodeError:
                args = None
            if isinstance(args, dict):
                call = {**call, "function": {**fn, "arguments": args}}
        decoded.append(call)
    return {**message, "tool_calls": decoded}


def validate_conversation(conversation: Any) -> Conversation:
    if not isinstance(conversation, Sequence) or isinstance(conversation, str) or not conversation:
        raise ValueError("a conversation must be a non-empty list of {'role': ..., 'content': ...} messages")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} of the conversation must be a dict with a 'role', got {m!r}")
        out.append(_arguments_as_objects(_flatten_content(i, m)))
    return out


def render_chat_text(
    tokenizer,
    conversation: Conversation,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render ``conversation`` with ``chat_template`` (else the model's); ``tools`` (OpenAI-style
    function schemas) go to the template, which may describe them.

    Tokenize the text without adding special tokens again: the template already places them, as
    transformers' ``apply_chat_template(tokenize=True)`` does. (The server tokenizes it off its event
    loop, so rendering and tokenizing are two steps.)"""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ValueError(
            "this model has no chat template: pass one with chat_template=... (a path or a Jinja string; "
            "load_chat_template() reads a file), or use generate() with a plain prompt"
        )
    if add_generation_prompt and continue_final_message:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be True")
    try:
        text = tokenizer.apply_chat_template(
            conversation,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            **(chat_template_kwargs or {}),
        )
    except (TemplateError, TypeError) as e:  # e.g. a message without the content the template reads
        raise ValueError(f"the chat template could not render this conversation: {e}") from e
    return text
