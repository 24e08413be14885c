"""What the host CPU can do, read once from ``/proc/cpuinfo`` (Linux; elsewhere nothing is assumed)."""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Feature flags under which bfloat16 matmuls run natively: AVX-512-BF16 and AMX on x86, BF16 on Arm.
_NATIVE_BF16 = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_model_and_flags() -> tuple[str, frozenset[str]]:
    """The model name and feature flags of the first CPU listed (no flags where they cannot be read)."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return platform.processor() or platform.machine(), frozenset()


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, feature flags) from the text of ``/proc/cpuinfo`` (x86 "flags", Arm "Features")."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = frozenset(value.split())
    return model or platform.machine(), flags


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether the CPU (this one, or one with ``flags``) computes bfloat16 products in hardware."""
    return bool(_NATIVE_BF16 & (cpu_model_and_flags()[1] if flags is None else flags))
