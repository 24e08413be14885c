"""Errors the engine raises when its processes fail."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """A worker process died or raised: the engine cannot run any more steps."""


class WorkerStartupError(RuntimeError):
    """A worker process failed to start (for example while loading its model shard)."""


class EngineStartupError(RuntimeError):
    """The engine-core process failed before it was ready (its error is in the message)."""
