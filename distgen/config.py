"""Typed engine configuration: one frozen object is built once and passed down."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from distgen.distributed.parallel_state import split_range

if TYPE_CHECKING:
    from distgen.arch_config import ArchConfig
    from distgen.model_loader.loader import ModelSource

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(
    dtype: str | torch.dtype, device: str, checkpoint_dtype: str | None, native_bf16: bool = False
) -> torch.dtype:
    """Resolve ``dtype`` ("auto", a name, or a torch dtype) for ``device``.

    "auto" takes the checkpoint's dtype, as vLLM does: float16/bfloat16 stay as they are on CUDA. On
    the CPU a 16-bit checkpoint runs in bfloat16 where the CPU has native bfloat16 products
    (``native_bf16``: AVX-512-BF16, AMX or Arm BF16) and in float32 elsewhere; float16 becomes
    bfloat16 there, as CPU matmuls in float16 are slow. float32 checkpoints stay float32.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        wanted = _DTYPES.get(checkpoint_dtype or "float32", torch.float32)
        if device == "cpu" and wanted in (torch.float16, torch.bfloat16):
            return torch.bfloat16 if native_bf16 else torch.float32
        return wanted
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}.")
    return _DTYPES[dtype]


# The architectures whose models can be cut into pipeline stages (models/llama.py and its subclasses).
PIPELINE_ARCHITECTURES = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Phi3ForCausalLM",
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
    }
)


def check_partition(layers: tuple[int, ...], pp: int, num_layers: int) -> None:
    if len(layers) != pp or sum(layers) != num_layers or min(layers) < 1:
        raise ValueError(
            f"the pipeline layer partition {list(layers)} must give each of the {pp} stages at least one "
            f"layer and {num_layers} layers in all"
        )


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_bytes(value: int | str, what: str = "kv_cache_memory_bytes") -> int:
    """Bytes as vLLM's ``--kv-cache-memory-bytes`` reads them: an int, or a number with a suffix,
    lower case decimal (``4g`` = 4e9) and upper case binary (``4G`` = 4 GiB); ``GiB``/``GB`` spelled out
    also mean binary/decimal."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(i?[bB])?\s*", value)
        if not m:
            raise ValueError(f"{what}: not a size: {value!r} (bytes, or a number with k/m/g/t or K/M/G/T)")
        unit, suffix = m.group(2), m.group(3) or ""
        if suffix.lower() == "ib" or (unit and suffix == "" and unit.isupper()):
            scale = _BINARY.get(unit.upper(), 1)
        else:
            scale = _DECIMAL.get(unit.lower(), 1)
        number = int(float(m.group(1)) * scale)
    else:
        raise TypeError(f"{what} must be an int or a size string, got {value!r}")
    if number < 1:
        raise ValueError(f"{what} must be at least 1 byte, got {value!r}")
    return number


@dataclass(frozen=True)
class ModelConfig:
    source: ModelSource  # where the model comes from: its path, config.json (or the GGUF's), format
    dtype: torch.dtype
    max_model_len: int
    seed: int = 0
    tokenizer: str | None = None
    generation_config: str = "auto"  # "auto" | "distgen" (ignore the file) | a path
    served_model_name: str | None = None
    enforce_eager: bool = False  # CUDA: no decode CUDA graphs, every step runs eagerly
    max_logprobs: int = 20  # most (prompt) logprobs a request may ask for per position
    # generation_config.json keys laid over the model's (or, with generation_config "distgen", alone)
    override_generation_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_model_len, int) or self.max_model_len < 1:
            raise ValueError(f"max_model_len must be an integer >= 1, got {self.max_model_len!r}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be an integer >= 0, got {self.max_logprobs!r}")
        if not -(2**63) <= self.seed < 2**63:  # what torch's generators (and SamplingParams.seed) take
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed!r}")

    @property
    def model(self) -> str:
        """The resolved path: a Hugging Face directory or a .gguf file."""
        return self.source.path

    @property
    def hf_config(self) -> dict[str, Any]:
        """config.json's contents (or the GGUF's equivalent), ``hf_overrides`` laid over them: the raw
        dict, for what is no architecture fact (dtype, quantization) or goes to transformers."""
        return self.source.hf_config

    @property
    def arch(self) -> ArchConfig:
        """The typed architecture the models read, resolved once from ``hf_config``."""
        return self.source.arch

    @property
    def runner_type(self) -> str:
        """vLLM's name for what the model runner does: every model distgen runs generates text."""
        return "generate"

    @property
    def architecture(self) -> str:
        return self.arch.architecture

    @property
    def long_rope_original(self) -> int | None:
        """LongRoPE's original length (Phi-3), past which a prompt is rotated with the long factors
        from its first token on (see :class:`distgen.layers.rotary.LongRopeSwitch`); else None."""
        return self.arch.long_rope_original

    @property
    def num_layers(self) -> int:
        return self.arch.num_layers

    @property
    def num_heads(self) -> int:
        return self.arch.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.arch.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.arch.head_dim

    def verify_pipeline_parallel(self, pp: int) -> None:
        """Every stage holds at least one layer, of a model that can be cut into stages."""
        if pp == 1:
            return
        if not 1 <= pp <= self.num_layers:
            raise ValueError(
                f"pipeline_parallel_size={pp} does not fit the model: it has {self.num_layers} layers, and "
                f"every stage needs at least one (use a size from 1 to {self.num_layers})"
            )
        if self.architecture not in PIPELINE_ARCHITECTURES:
            raise ValueError(
                f"pipeline parallelism is not supported for {self.architecture}: it is for "
                f"{', '.join(sorted(PIPELINE_ARCHITECTURES))}"
            )

    def pipeline_partition(self, pp: int) -> tuple[int, ...]:
        """Layers per stage, balanced by cost: the last stage also runs the LM head, for every token
        that samples (each decode token), which costs ``vocab x hidden`` multiply-adds against a layer's
        weights; it takes that many fewer layers (at least one), the others split the rest evenly."""
        n = self.num_layers
        if pp == 1:
            return (n,)
        hidden = self.arch.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        layer = hidden * (2 * q + 2 * kv) + 3 * hidden * self.arch.active_mlp_width
        head = self.vocab_size / layer * hidden
        last = min(max(1, round((n + head) / pp - head)), n - (pp - 1))
        return tuple(split_range(n - last, pp - 1, i)[1] for i in range(pp - 1)) + (last,)

    @property
    def vocab_size(self) -> int:
        return self.arch.vocab_size

    def verify_tensor_parallel(self, tp: int) -> None:
        """Any TP size up to the number of attention heads: heads are split as evenly as the ranks
        allow, and a KV head is held by every rank whose query heads read it (the typed config has
        checked that the heads are a multiple of the KV heads)."""
        heads = self.num_heads
        if not 1 <= tp <= heads:
            raise ValueError(
                f"tensor_parallel_size={tp} does not fit the model: it has {heads} attention heads, and "
                f"every rank needs at least one (use a size from 1 to {heads})"
            )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes (CPU); None = derive from gpu_memory_utilization
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    num_blocks: int | None = None  # forced block count (tests); None = from memory

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}.")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # Schedule step n+1 while step n runs on the GPU, its inputs taking step n's sampled tokens on
    # the device: the host's per-step work no longer leaves the GPU idle.
    async_scheduling: bool = False
    # "fcfs" (arrival order) or "priority" (by each request's priority, lower first, then arrival).
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.policy!r}.")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}.")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}.")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # None | "uni" | "mp" | "ray"
    # Stages of contiguous layers; global rank r is TP rank r % tp of stage r // tp.
    pipeline_parallel_size: int = 1
    # CPU workers' OpenMP threads: "auto" | "nobind" | CPU lists per local rank, "0-3|4-7" (vLLM's
    # VLLM_CPU_OMP_THREADS_BIND values; see workers/cpu_threads.py)
    cpu_omp_threads_bind: str = "auto"
    # A lost worker (dead, raising, or silent past worker_step_timeout_s) is replaced and its requests
    # recomputed, up to max_worker_restarts times in worker_restart_window_s; 0 turns recovery off.
    max_worker_restarts: int = 3
    worker_restart_window_s: float = 600.0
    worker_step_timeout_s: float | None = 300.0  # None: wait for a step however long it takes
    # Engine replicas behind one front end (frontend/dp_client.py); each replica's config carries its own
    # rank, so its workers take their share of this host's cores (and GPUs) next to the other replicas'.
    data_parallel_size: int = 1
    data_parallel_rank: int = 0
    # Layers per pipeline stage (None: one stage); resolved by EngineArgs from the model's costs.
    pipeline_layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {self.data_parallel_size}.")
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(
                f"data_parallel_rank must be in [0, {self.data_parallel_size}), "
                f"got {self.data_parallel_rank}."
            )
        if self.max_worker_restarts < 0:
            raise ValueError(f"max_worker_restarts must be >= 0, got {self.max_worker_restarts}.")
        if not self.worker_restart_window_s > 0:
            raise ValueError(f"worker_restart_window_s must be > 0, got {self.worker_restart_window_s}.")
        if self.worker_step_timeout_s is not None and not self.worker_step_timeout_s > 0:
            raise ValueError(f"worker_step_timeout_s must be > 0 or None, got {self.worker_step_timeout_s}.")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}.")
        if self.pipeline_parallel_size < 1:
            raise ValueError(f"pipeline_parallel_size must be >= 1, got {self.pipeline_parallel_size}.")
        if self.distributed_executor_backend not in (None, "uni", "mp", "ray"):
            raise ValueError(
                "distributed_executor_backend must be one of None, 'uni', 'mp', 'ray', "
                f"got {self.distributed_executor_backend!r}."
            )
        bind = self.cpu_omp_threads_bind
        if bind not in ("auto", "nobind") and not re.fullmatch(r"[\d,\-\s]+(\|[\d,\-\s]+)*", bind):
            raise ValueError(
                f"cpu_omp_threads_bind must be 'auto', 'nobind' or CPU lists per worker like '0-3|4-7', "
                f"got {bind!r}."
            )

    @property
    def world_size(self) -> int:
        """Workers of one engine: every TP rank of every pipeline stage."""
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.model.verify_tensor_parallel(self.parallel.tensor_parallel_size)
        self.model.verify_pipeline_parallel(self.parallel.pipeline_parallel_size)
        layers = self.parallel.pipeline_layers
        if layers is not None:
            check_partition(layers, self.parallel.pipeline_parallel_size, self.model.num_layers)
