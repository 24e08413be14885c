"""Environment settings, read in one place into one typed object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Envs:
    # Run the engine core in its own process (the default), or inside the caller's process (debugging).
    enable_multiprocessing: bool
    # How long the front end waits for the engine core to load the model and report ready.
    engine_ready_timeout_s: float
    # Where converted tokenizers are cached.
    cache_dir: str
    # Which kernels the layers use: auto (Triton on CUDA, the CPU kernels on the CPU), torch, triton, cpu.
    kernels: str
    # The server's API key when --api-key is not given (a flag shows in `ps`; the environment does not).
    api_key: str | None
    # The most sequences one request may ask for (n): each is a request of its own to the engine core,
    # so n in the billions would tie up the front end and exhaust its memory (vLLM's limit, too).
    max_n_sequences: int
    # CPU workers' OpenMP threads and their CPUs: auto | nobind | "0-3|4-7" (see workers/cpu_threads.py).
    cpu_omp_threads_bind: str
    # Layers per pipeline stage, "19,11" (vLLM's VLLM_PP_LAYER_PARTITION); None: balanced by cost.
    pp_layer_partition: tuple[int, ...] | None
    # Activations of the quantized CPU GEMM: float (each weight block dequantized inside the GEMM) or
    # int8 (quantized per block of 32, AVX-512 VNNI). See kernels/quant.py.
    quant_activations: str = "float"


_FALSE = ("0", "false", "no", "off")


def envs() -> Envs:
    env = os.environ
    return Envs(
        enable_multiprocessing=env.get("DISTGEN_ENABLE_MULTIPROCESSING", "1").lower() not in _FALSE,
        engine_ready_timeout_s=_positive_float(env, "DISTGEN_ENGINE_READY_TIMEOUT_S", 600.0),
        cache_dir=env.get("DISTGEN_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "distgen")),
        kernels=env.get("DISTGEN_KERNELS", "auto"),
        api_key=env.get("DISTGEN_API_KEY") or None,
        max_n_sequences=_positive_int(env, "DISTGEN_MAX_N_SEQUENCES", 16384),
        cpu_omp_threads_bind=env.get("DISTGEN_CPU_OMP_THREADS_BIND", "auto").strip(),
        pp_layer_partition=_int_list(env, "DISTGEN_PP_LAYER_PARTITION"),
        quant_activations=_choice(env, "DISTGEN_QUANT_ACTIVATIONS", ("float", "int8")),
    )


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    text = env.get(name, choices[0]).strip().lower()
    if text not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


def _int_list(env: Mapping[str, str], name: str) -> tuple[int, ...] | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise ValueError(f"{name} must be comma-separated layer counts like '19,11', got {text!r}")
    return tuple(int(p) for p in parts)


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name)
    if text is None:
        return default
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, got {text!r}")
    return int(text)


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {text!r}")
    return value
