"""User-facing engine knobs (vLLM's names) and their resolution into an ``EngineConfig``."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

import torch

from distgen.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    human_readable_bytes,
    parse_dtype,
)
from distgen.cpu_info import native_bf16
from distgen.envs import envs
from distgen.executor.base import Executor
from distgen.model_loader.loader import ModelSource, local_path, resolve_model
from distgen.model_loader.quantization import METHODS as QUANTIZATION_METHODS
from distgen.model_loader.quantization import resolve_quantization

logger = logging.getLogger("distgen")

RUNNERS = ("auto", "generate", "pooling", "draft")  # vLLM's --runner values
CONVERTS = ("auto", "none", "embed", "classify", "reward")  # vLLM's --convert values


@dataclass
class EngineArgs:
    model: str | os.PathLike | None = None
    tokenizer: str | os.PathLike | None = None
    dtype: str | torch.dtype = "auto"
    seed: int = 0
    max_model_len: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1  # engine replicas behind one front end, each with tensor_parallel_size ranks
    distributed_executor_backend: str | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_memory_bytes: int | str | None = None  # vLLM's name: an int, or "4G" (GiB) / "4g" (1e9)
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
    scheduling_policy: str = "fcfs"
    max_logprobs: int = 20
    disable_log_stats: bool = False  # serve: no periodic line of engine stats in the log
    # CPU workers' OpenMP threads: auto | nobind | "0-3|4-7"; None: $DISTGEN_CPU_OMP_THREADS_BIND or auto
    cpu_omp_threads_bind: str | None = None
    # Worker recovery (mp and ray): restarts allowed per window (0: a lost worker ends every request)
    max_worker_restarts: int = 3
    worker_restart_window_s: float = 600.0
    worker_step_timeout_s: float | None = 300.0  # a worker silent this long in a step is lost
    # Accepted as vLLM spells them, so its launch lines and scripts run unchanged. Each is checked in
    # create_config: what distgen does one way only is refused when asked otherwise (a ValueError
    # saying so), and what has no counterpart here changes nothing (an INFO line says so).
    trust_remote_code: bool = False  # no model code is ever loaded: only built-in architectures run
    runner: str = "auto"  # auto | generate: every architecture distgen runs is generative
    convert: str = "auto"  # auto | none: no model is converted into a pooling model
    revision: str | None = None  # of a hub model (a branch, tag or commit); default: main
    download_dir: str | None = None  # where hub models are downloaded (default: the Hugging Face cache)
    load_format: str = "auto"  # auto | safetensors | gguf: must match what the model path holds
    tokenizer_mode: str = "auto"  # auto | hf: the model's own tokenizer
    # None: the checkpoint's own (a GGUF file runs quantized); "gguf" | "compressed-tensors": the same,
    # checked; "none": dequantized to dtype at load (distgen.model_loader.quantization)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto: the KV cache holds the model's dtype
    pipeline_parallel_size: int = 1
    swap_space: float = 4.0  # no effect: a preempted request is recomputed, never swapped
    disable_custom_all_reduce: bool = False  # no effect: all-reduce is NCCL's (gloo's on the CPU)
    override_generation_config: dict | None = None  # e.g. {"temperature": 0.5}, over the model's
    hf_overrides: dict | None = None  # config.json keys replaced (nested mappings merged) before load

    def __post_init__(self) -> None:
        """Every argument must have its declared type: ``enforce_eager="no"`` would otherwise count as
        True, and ``tensor_parallel_size="2"`` fail deep inside with a TypeError about ``<``."""
        hints = typing.get_type_hints(EngineArgs)
        for f in fields(self):
            check_type(f.name, getattr(self, f.name), hints[f.name])

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(**kwargs)

    def _check_vllm_only_args(self) -> None:
        """vLLM's arguments that distgen takes but has one way of doing: refuse what it cannot do."""
        refused = [
            (
                self.runner not in RUNNERS,
                f"runner must be one of {', '.join(RUNNERS)} (vLLM's), got {self.runner!r}",
            ),
            (
                self.runner in ("pooling", "draft"),
                f"runner={self.runner!r} is not supported: distgen runs generative models only "
                "(runner 'generate', which 'auto' resolves to for every architecture it serves)",
            ),
            (
                self.convert not in CONVERTS,
                f"convert must be one of {', '.join(CONVERTS)} (vLLM's), got {self.convert!r}",
            ),
            (
                self.convert in ("embed", "classify", "reward"),
                f"convert={self.convert!r} turns the model into a pooling model, which distgen does not "
                "run: use convert='auto' or 'none'",
            ),
            (
                self.quantization not in (None, *QUANTIZATION_METHODS),
                f"quantization={self.quantization!r} is not supported: None (the checkpoint's own), "
                + ", ".join(repr(m) for m in QUANTIZATION_METHODS),
            ),
            (
                self.kv_cache_dtype != "auto",
                f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported: the "
                "KV cache holds the model's dtype ('auto')",
            ),
            (
                self.tokenizer_mode not in ("auto", "hf"),
                f"tokenizer_mode={self.tokenizer_mode!r} is not "
                "supported: the model's own tokenizer is used ('auto')",
            ),
            (
                self.load_format not in ("auto", "safetensors", "gguf"),
                f"load_format={self.load_format!r} is "
                "not supported: 'auto', 'safetensors' (a Hugging Face directory) or 'gguf' (a .gguf file)",
            ),
        ]
        for bad, why in refused:
            if bad:
                raise ValueError(why)
        ignored = [
            (
                self.trust_remote_code,
                "trust_remote_code: no model code is loaded, only distgen's architectures run",
            ),
            (self.swap_space != 4, "swap_space: a preempted request is recomputed, never swapped"),
            (
                self.disable_custom_all_reduce,
                "disable_custom_all_reduce: all-reduce is always NCCL's (gloo's on the CPU)",
            ),
        ]
        for given, why in ignored:
            if given:
                logger.info("has no effect in distgen: %s", why)

    def kv_cache_bytes(self) -> int | None:
        """The KV cache budget from ``kv_cache_memory`` (bytes) or vLLM's ``kv_cache_memory_bytes``
        (the same, in the units vLLM's flag takes); giving both with different values is an error."""
        if self.kv_cache_memory_bytes is None:
            return self.kv_cache_memory
        given = human_readable_bytes(self.kv_cache_memory_bytes)
        if self.kv_cache_memory is not None and self.kv_cache_memory != given:
            raise ValueError(
                f"kv_cache_memory={self.kv_cache_memory} and kv_cache_memory_bytes="
                f"{self.kv_cache_memory_bytes!r} ({given} bytes) disagree: give one of them"
            )
        return given

    def create_config(self) -> EngineConfig:
        self._check_vllm_only_args()
        source = self._model_source()
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        backend = Executor.resolve_backend(self.distributed_executor_backend, world)
        device = self.device or default_device(backend)
        check_device(device, backend)
        model_cfg = self._model_config(source, device)
        batched = self._max_num_batched_tokens(model_cfg.max_model_len)
        config = EngineConfig(
            model=model_cfg,
            cache=self._cache_config(),
            scheduler=self._scheduler_config(batched),
            parallel=self._parallel_config(backend, model_cfg),
            device=device,
        )
        return config

    def _model_source(self) -> ModelSource:
        """The model found (and downloaded when it is a hub id), with ``hf_overrides`` laid over its
        config, checked against ``load_format``."""
        source = resolve_model(self.model, self.revision, self.download_dir)
        if self.hf_overrides:
            merged = merge_overrides(source.hf_config, self.hf_overrides)
            source = dataclasses.replace(source, hf_config=merged)
            logger.info("hf_overrides: %s", self.hf_overrides)
        if self.load_format != "auto" and (self.load_format == "gguf") != source.is_gguf:
            held = "a GGUF file" if source.is_gguf else "a Hugging Face directory (safetensors)"
            raise ValueError(f"load_format={self.load_format!r}, but the model path holds {held}")
        quant = resolve_quantization(self.quantization, source.hf_config, source.is_gguf)
        source = dataclasses.replace(source, quantization=quant)
        logger.info("weights: %s", f"quantized ({quant})" if quant else "float")
        logger.info(
            "runner: generate (%s%s)",
            "resolved from 'auto': " if self.runner == "auto" else "",
            ", ".join(source.hf_config.get("architectures") or ["no architectures listed"]),
        )
        return source

    def _model_config(self, source: ModelSource, device: str) -> ModelConfig:
        hf = source.hf_config
        max_pos = source.arch.max_position_embeddings or 2048
        max_len = max_pos if self.max_model_len is None else self.max_model_len
        gen = self.generation_config
        if gen == "vllm":
            gen = "distgen"
        checkpoint_dtype = hf.get("torch_dtype") or hf.get("dtype")
        dtype = parse_dtype(self.dtype, device, checkpoint_dtype, native_bf16())
        if self.dtype == "auto":
            logger.info("dtype auto: %s (checkpoint: %s, device: %s)", dtype, checkpoint_dtype, device)
        model_cfg = ModelConfig(
            source=source,
            dtype=dtype,
            max_model_len=max_len,
            seed=self.seed,
            tokenizer=None
            if self.tokenizer is None
            else local_path(self.tokenizer, "tokenizer", None, self.download_dir),
            generation_config=gen,
            served_model_name=self.served_model_name or os.fspath(self.model or "SmolLM2-135M-Instruct"),
            enforce_eager=self.enforce_eager,
            max_logprobs=self.max_logprobs,
            override_generation_config=self.override_generation_config,
        )  # checks max_model_len and max_logprobs themselves, as the other configs check theirs
        if max_len > max_pos:
            raise ValueError(f"max_model_len {max_len} exceeds the model's max_position_embeddings {max_pos}")
        return model_cfg

    def _max_num_batched_tokens(self, max_len: int) -> int:
        """The step's token budget: given, or 2048 (with chunked prefill) or room for the longest
        prompt (without, since a prompt then runs in one step)."""
        batched = self.max_num_batched_tokens
        if batched is None:
            batched = 2048 if self.enable_chunked_prefill else max(2048, max_len)
        if not self.enable_chunked_prefill and batched < max_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({batched}) must be at least "
                f"max_model_len ({max_len}), or a long prompt could never be scheduled"
            )
        return batched

    def _cache_config(self) -> CacheConfig:
        return CacheConfig(
            self.block_size,
            self.kv_cache_bytes(),
            self.gpu_memory_utilization,
            self.enable_prefix_caching,
            self.num_gpu_blocks_override,
        )

    def _scheduler_config(self, max_num_batched_tokens: int) -> SchedulerConfig:
        return SchedulerConfig(
            self.max_num_seqs,
            max_num_batched_tokens,
            self.enable_chunked_prefill,
            self.async_scheduling,
            self.scheduling_policy,
        )

    def _parallel_config(self, backend: str, model: ModelConfig) -> ParallelConfig:
        """``backend`` is resolved in the user's process: a Ray cluster it is connected to means "ray"."""
        pp, layers = self.pipeline_parallel_size, None
        if pp > 1:  # a size that does not fit the model fails EngineConfig's checks, before the partition's
            layers = envs().pp_layer_partition or model.pipeline_partition(pp)
            logger.info("pipeline stages: %s layers", list(layers))
        return ParallelConfig(
            self.tensor_parallel_size,
            backend,
            self.pipeline_parallel_size,
            self.cpu_omp_threads_bind or envs().cpu_omp_threads_bind,
            self.max_worker_restarts,
            self.worker_restart_window_s,
            self.worker_step_timeout_s,
            self.data_parallel_size,
            pipeline_layers=layers,
        )


def merge_overrides(config: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``overrides`` laid over it: a mapping given for a mapping is merged key by key
    (``{"rope_scaling": {"factor": 2.0}}`` keeps the other rope settings), anything else replaced."""
    out = dict(config)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_overrides(out[key], value)
        else:
            out[key] = value
    return out


def check_type(name: str, value: Any, hint: Any) -> None:
    """Raise TypeError naming ``name`` unless ``value`` fits ``hint`` (a type or a union of types).
    A bool is not an int here, and an int is a float."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = typing.get_args(hint) if union else (hint,)
    for t in allowed:
        if t is type(None):
            ok = value is None
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, t)
        if ok:
            return
    names = " or ".join("None" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise TypeError(f"{name} must be {names}, got {value!r} ({type(value).__name__})")


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
