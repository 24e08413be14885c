"""``distgen collect-env``: what a bug report needs about the machine and the software, as
``vllm collect-env`` prints it."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def collect() -> dict[str, str]:
    import torch

    from distgen.cpu_info import cpu_model_and_flags, native_bf16

    model, flags = cpu_model_and_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "asimd", "bf16")
    info = {
        "distgen": _version("distgen"),
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "cpu": model,
        "cpu flags (that matter)": " ".join(f for f in wanted if f in flags) or "none of them",
        "cpu native bfloat16": str(native_bf16(flags)),
        "cpus usable": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "?",
        "torch": torch.__version__,
        "torch cuda": str(torch.version.cuda),
        "gpus": ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) or "none",
    }
    for package in ("transformers", "tokenizers", "huggingface_hub", "triton", "ray", "fastapi", "uvicorn"):
        info[package] = _version(package)
    for var in ("DISTGEN_KERNELS", "DISTGEN_CPU_OMP_THREADS_BIND", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        if var in os.environ:
            info[var] = os.environ[var]
    return info


def main() -> None:
    info = collect()
    width = max(map(len, info))
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
