"""The executor interface: owns the workers and runs one step on all of them."""

from __future__ import annotations

from abc import ABC, abstractmethod

from distgen.config import EngineConfig
from distgen.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from distgen.model_loader.loader import ModelSource


class Executor(ABC):
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.config = config
        self.source = source

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV cache blocks that fit on every rank (the minimum over ranks)."""

    @abstractmethod
    def init_kv_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's answer."""

    @abstractmethod
    def shutdown(self) -> None: ...

    @staticmethod
    def create(config: EngineConfig, source: ModelSource) -> Executor:
        backend = config.parallel.distributed_executor_backend
        tp = config.parallel.tensor_parallel_size
        if backend is None:
            backend = "uni" if tp == 1 else "mp"
        if backend == "uni":
            if tp != 1:
                raise ValueError(
                    f"the 'uni' executor runs one worker; tensor_parallel_size={tp} needs 'mp' or 'ray'"
                )
            from distgen.executor.uniproc import UniProcExecutor

            return UniProcExecutor(config, source)
        if backend == "mp":
            from distgen.executor.multiproc import MultiprocExecutor

            return MultiprocExecutor(config, source)
        if backend == "ray":
            raise NotImplementedError(
                "distributed_executor_backend='ray' is not implemented yet; use 'mp' for tensor "
                "parallelism on one host"
            )
        raise ValueError(f"unknown distributed_executor_backend {backend!r}: use 'uni', 'mp' or 'ray'")
