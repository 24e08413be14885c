"""One worker inside the engine-core process (tensor_parallel_size == 1)."""

from __future__ import annotations

from distgen.config import EngineConfig
from distgen.executor.base import Executor
from distgen.executor.worker_loop import setup_cpu_threads
from distgen.workers.sampled_output import SampledOutput
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput
from distgen.workers.worker import Worker


class UniProcExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        setup_cpu_threads(config, 0, 1)
        self.worker = Worker(config, rank=0)

    def determine_num_blocks(self) -> int:
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.worker.init_kv_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        out = self.worker.execute_model(sched)
        assert out is not None
        return out

    def submit(self, sched: SchedulerOutput) -> SampledOutput:
        """Launch a step without waiting for it (async scheduling)."""
        out = self.worker.submit(sched)
        assert out is not None
        return out

    def shutdown(self) -> None:
        self.worker.shutdown()
