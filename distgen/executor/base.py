"""The executor interface: owns the workers and runs one step on all of them."""

from __future__ import annotations

import importlib.util
import os
import sys
from abc import ABC, abstractmethod
from typing import Protocol

from distgen.config import EngineConfig
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput


class PendingOutput(Protocol):
    """A launched step (async scheduling); ``get`` waits for its output."""

    def get(self) -> ModelRunnerOutput: ...


class Executor(ABC):
    restartable = False  # whether lost workers can be replaced (the in-process one cannot)

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV cache blocks that fit on every rank (the minimum over ranks)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's answer."""

    def submit(self, sched: SchedulerOutput) -> PendingOutput:
        """Launch one step without waiting for its tokens (async scheduling). Steps are collected
        (``get()``) in the order they were launched."""
        raise NotImplementedError(f"{type(self).__name__} does not run steps asynchronously")

    @abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    def resolve_backend(backend: str | None, world_size: int) -> str:
        """The backend ``None`` stands for: ``uni`` for one worker; ``ray`` when this process is connected
        to a Ray cluster (or ``RAY_ADDRESS`` names one, as in a Ray job); ``mp`` otherwise. A front end that
        starts the engine core in another process should resolve this first, where the user's Ray is."""
        if backend is not None:
            return backend
        if world_size == 1:
            return "uni"
        return "ray" if _ray_connected() else "mp"

    @staticmethod
    def create(config: EngineConfig) -> Executor:
        world = config.parallel.world_size
        backend = Executor.resolve_backend(config.parallel.distributed_executor_backend, world)
        if backend == "uni":
            if world != 1:
                raise ValueError(
                    f"the 'uni' executor runs one worker; {world} workers (tensor_parallel_size x "
                    "pipeline_parallel_size) need 'mp' or 'ray'"
                )
            from distgen.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config)
        if backend == "mp":
            from distgen.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config)
        if backend == "ray":
            from distgen.executor.ray_executor import RayExecutor

            return RayExecutor(config)
        raise ValueError(f"unknown distributed_executor_backend {backend!r}: use 'uni', 'mp' or 'ray'")


def _ray_connected() -> bool:
    """Without importing Ray: an initialized Ray must already be imported."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return True
    if os.environ.get("RAY_ADDRESS", "") not in ("", "local"):
        return importlib.util.find_spec("ray") is not None
    return False
