"""A CPU worker's heap: freed step memory stays in the process for the next step.

Each step allocates its activations afresh (in a 2048-token bfloat16 prefill chunk, a few MB each, several
per layer). With glibc's defaults, a block past its dynamic mmap threshold is mapped on allocation and
unmapped on free, and a heap top past the trim threshold goes back to the OS, so the next step faults
the same pages in again and the kernel zeroes every one: 310,000 of the 775,000 page faults of a run of
2 x 16 1024-token prompts (benchmarks/NOTES.md). Raising the mmap threshold to glibc's largest (32 MiB)
and the trim threshold out of reach keeps freed pages in the heap for reuse, at the cost of holding
the largest step's activations (tens of MB) resident.

The user's own settings (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) win;
on a C library other than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
import platform

import torch

logger = logging.getLogger("distgen")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for the mmap threshold on 64-bit
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Sets the two thresholds for this process; whether it did."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    if not done:
        logger.debug("mallopt refused the heap thresholds; freed step memory goes back to the OS")
    return done


def zeroed_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor on a fresh anonymous mapping of its own: it reads as zeros until written, and the
    kernel supplies each page (zeroed) on first touch, so no pass over it is needed up front or later.
    The mapping is unmapped when the tensor is freed."""
    nbytes = math.prod(shape) * dtype.itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
