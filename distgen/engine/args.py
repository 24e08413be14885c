"""User-facing engine knobs (vLLM's names) and their resolution into an ``EngineConfig``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any

import torch

from distgen.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    parse_dtype,
)
from distgen.executor.base import Executor
from distgen.model_loader.loader import ModelSource, resolve_model


@dataclass
class EngineArgs:
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    generation_config: str = "auto"
    served_model_name: str | None = None
    device: str | None = None
    enforce_eager: bool = False
    async_scheduling: bool = False
    max_logprobs: int = 20

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def create_config(self) -> tuple[EngineConfig, ModelSource]:
        source = resolve_model(self.model)
        hf = source.hf_config
        backend = Executor.resolve_backend(self.distributed_executor_backend, self.tensor_parallel_size)
        device = self.device or default_device(backend)
        check_device(device, backend)
        max_pos = int(hf.get("max_position_embeddings") or 2048)
        max_len = max_pos if self.max_model_len is None else self.max_model_len
        gen = self.generation_config
        if gen == "vllm":
            gen = "distgen"
        model_cfg = ModelConfig(
            model=source.path,
            hf_config=hf,
            dtype=parse_dtype(self.dtype, device, hf.get("torch_dtype") or hf.get("dtype")),
            max_model_len=max_len,
            seed=self.seed,
            tokenizer=self.tokenizer,
            generation_config=gen,
            served_model_name=self.served_model_name or self.model or "SmolLM2-135M-Instruct",
            enforce_eager=self.enforce_eager,
            max_logprobs=self.max_logprobs,
        )  # checks max_model_len and max_logprobs themselves, as the other configs check theirs
        if max_len > max_pos:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {max_pos}")
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max(2048, max_len)
        if not self.enable_chunked_prefill and batched < max_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({batched}) must be at least "
                f"max_model_len ({max_len}), or a long prompt could never be scheduled"
            )
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(
                self.block_size,
                self.kv_cache_memory,
                self.gpu_memory_utilization,
                self.enable_prefix_caching,
                self.num_gpu_blocks_override,
            ),
            scheduler=SchedulerConfig(
                self.max_num_seqs, batched, self.enable_chunked_prefill, self.async_scheduling
            ),
            # Resolved here, in the user's process: a Ray cluster it is connected to means "ray".
            parallel=ParallelConfig(self.tensor_parallel_size, backend),
            device=device,
        ), source


def check_device(device: str, backend: str) -> None:
    """A device the engine can run on, named before any process starts: ``cpu`` or ``cuda[:N]``, and
    CUDA only where torch sees a GPU (or where Ray actors on other nodes will)."""
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}") from e
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if kind == "cuda" and backend != "ray" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ValueError(
            f"device={device!r} but torch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
            "use device='cpu', or run where a GPU is visible"
        )


def default_device(backend: str) -> str:
    """CUDA when this machine has a GPU, or when the ranks are Ray actors in a cluster that has GPUs
    (the engine core may run on a node without one); the CPU otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    if backend == "ray":
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0:
            return "cuda"
    return "cpu"
