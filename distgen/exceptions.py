"""Errors the engine raises when its processes fail. A module below every layer: the executors raise
them, the engine core and the front end catch them."""

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
