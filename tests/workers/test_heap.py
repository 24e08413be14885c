"""A CPU worker keeps freed step memory (workers/heap.py): a step-like round (ten 4 MB buffers live at
once, then all freed) runs again without page faults, where glibc's defaults give the 40 MB heap top
back to the OS and fault it in afresh every round; and a user's own malloc settings are left alone.
Each case runs in a fresh interpreter, so that neither this process's heap history nor its settings
decide the outcome."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt"
)

# Faults in ten rounds after a first one; a round allocates and touches ten 4 MB buffers, then frees them.
PROBE = """
import resource, sys
from distgen.workers.heap import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "on" else False
def cycle():
    bufs = [bytearray(4 << 20) for _ in range(10)]
    for buf in bufs:
        for i in range(0, len(buf), 4096):
            buf[i] = 1
    del bufs
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    cycle()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, **env: str) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.split()
    return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_faults():
    applied, faults = probe("on")
    assert applied
    assert faults < 1000, faults  # a round touches 10240 pages: none of the ten rounds faults them again
    _, default_faults = probe("off")
    assert default_faults > 10 * 9000, default_faults  # glibc's defaults trim and fault them every round


def test_the_users_own_malloc_settings_win():
    applied, faults = probe("on", MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    assert not applied
    assert faults > 10 * 9000, faults
