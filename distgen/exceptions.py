"""Errors the engine raises when its processes fail, and for a prompt it can never run. A module below
every layer: the executors and the front end's input processor raise them, the engine core, the front
end and the OpenAI server catch them (the server translates the prompt errors into its 400s)."""

from __future__ import annotations

import signal


class EngineDeadError(RuntimeError):
    """A worker process died or raised: the engine cannot run any more steps."""


class ReplicaDeadError(EngineDeadError):
    """One data-parallel replica died while others still serve: only its requests end.

    ``request_ids`` are the engine-core ids it held (the children of an n>1 request included); the
    front end fails each one's request with this error and goes on."""

    def __init__(self, message: str, request_ids: list[str]) -> None:
        super().__init__(message)
        self.request_ids = request_ids


class InvalidPromptError(ValueError):
    """A prompt the engine can never run: empty, too long, out of the vocabulary, or text that is not
    Unicode. ``param`` is the request field the prompt came from (a chat request's text is its
    ``messages``); the OpenAI server answers 400 naming it."""

    def __init__(self, message: str, param: str = "prompt") -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidPromptError):
    """A prompt that leaves no room for one generated token in ``max_model_len``. ``num_tokens`` is its
    length; when only its text was measured (before tokenizing a very long text), ``chars`` is its
    characters and ``num_tokens`` the fewest tokens they can be (no token is longer than
    ``token_chars`` characters)."""

    def __init__(
        self,
        num_tokens: int,
        max_model_len: int,
        chars: int | None = None,
        token_chars: int | None = None,
        param: str = "prompt",
    ) -> None:
        self.num_tokens, self.max_model_len = num_tokens, max_model_len
        self.chars, self.token_chars = chars, token_chars
        if chars is None:
            what = f"{num_tokens} tokens"
        else:
            what = (
                f"{chars} characters, at least {num_tokens} tokens (no token of this model is longer "
                f"than {token_chars} characters)"
            )
        super().__init__(
            f"the prompt has {what}, but the maximum model length is {max_model_len} "
            "(the prompt plus at least one generated token must fit)",
            param,
        )


class WorkerStartupError(RuntimeError):
    """A worker process failed to start (for example while loading its model shard)."""


class EngineStartupError(RuntimeError):
    """The engine-core process failed before it was ready (its error is in the message)."""


# What a setting the model cannot take raises while the engine starts (a KV budget under one block):
# raised to the caller as itself, with its message, across the processes; its stack is for debugging.
SETTING_ERRORS: dict[str, type[Exception]] = {
    cls.__name__: cls for cls in (ValueError, TypeError, KeyError, FileNotFoundError, NotImplementedError)
}


def describe_exit(code: int) -> str:
    """How a child process ended, from its exit code (negative: the signal that killed it)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
