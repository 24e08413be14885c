"""One rank: joins its TP group and pipeline stage, holds a model shard and its KV cache slice."""

from __future__ import annotations

import logging

import torch

from distgen.config import EngineConfig
from distgen.distributed import parallel_state as ps
from distgen.workers.model_runner import ModelRunner
from distgen.workers.sampled_output import SampledOutput
from distgen.workers.scheduler_output import ModelRunnerOutput, SchedulerOutput

logger = logging.getLogger("distgen")


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        rank: int = 0,
        init_method: str | None = None,
        device_index: int | None = None,  # the CUDA device; None = the rank (Ray: 0, it hides the others)
    ) -> None:
        self.config = config
        self.rank = rank
        par = config.parallel
        if par.world_size > 1:
            backend = ps.default_backend(config.device)
            tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
            ps.init_parallel_groups(rank, tp, pp, init_method or "", backend, par.pipeline_layers)
        if config.device.startswith("cuda"):
            torch.cuda.set_device(rank if device_index is None else device_index)
        torch.manual_seed(config.model.seed)
        self.runner = ModelRunner(config)

    def determine_num_blocks(self) -> int:
        return self.runner.num_blocks_for()

    def init_kv_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def execute_model(self, sched: SchedulerOutput) -> ModelRunnerOutput | None:
        return self.runner.execute_model(sched)

    def submit(self, sched: SchedulerOutput) -> SampledOutput | None:
        return self.runner.submit(sched)

    def shutdown(self) -> None:
        ps.destroy_parallel_groups()
