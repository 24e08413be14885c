"""How many OpenMP threads a CPU worker runs, and on which CPUs, chosen from the machine.

``DISTGEN_CPU_OMP_THREADS_BIND`` (or ``EngineArgs.cpu_omp_threads_bind``) takes vLLM's values:
- ``auto`` (default): the CPUs this process may use (its affinity mask), one per physical core (SMT
  siblings share a core's FMA units, and a second thread there only adds barrier waits), split into
  contiguous equal shares, one per worker on this machine; each worker runs one thread per CPU of its
  share, each thread pinned to its CPU, so tensor-parallel ranks never compete for a core (with more
  workers than cores, each runs one unpinned thread and the OS places them);
- ``nobind``: torch's own thread count, no pinning (what a process gets without distgen);
- an explicit list per local rank, ``0-3|4-7`` (ranges and commas, ``|`` between ranks).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("distgen")


def physical_cores(cpus: list[int]) -> list[int]:
    """The first CPU of each physical core among ``cpus`` (all of them where the topology is unknown)."""
    seen: set[tuple[str, str]] = set()
    keep = []
    for cpu in sorted(cpus):
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            core = (
                (topo / "physical_package_id").read_text().strip(),
                (topo / "core_id").read_text().strip(),
            )
        except OSError:
            return sorted(cpus)
        if core not in seen:
            seen.add(core)
            keep.append(cpu)
    return keep


def parse_cpu_list(text: str) -> list[int]:
    """``"0-3,8"`` -> [0, 1, 2, 3, 8]; a ValueError names a malformed list."""
    cpus: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise ValueError(f"cpu_omp_threads_bind: {part!r} in {text!r} is not a CPU number or a-b range")
        cpus.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return cpus


def plan(spec: str, local_rank: int, local_size: int, available: list[int]) -> list[int] | None:
    """The CPUs local rank ``local_rank`` of ``local_size`` runs its threads on; None: no binding
    (``nobind``, or ``auto`` with more workers on this machine than cores, see :func:`configure`)."""
    if spec == "nobind":
        return None
    if spec == "auto":
        cores = physical_cores(available) or sorted(available)
        if len(cores) < local_size:
            return None
        share = len(cores) // local_size
        return cores[local_rank * share : (local_rank + 1) * share]
    shares = spec.split("|")
    if len(shares) != local_size:
        raise ValueError(
            f"cpu_omp_threads_bind {spec!r} lists {len(shares)} CPU sets for {local_size} workers on this "
            "machine; give one per worker, separated by '|'"
        )
    cpus = parse_cpu_list(shares[local_rank])
    missing = sorted(set(cpus) - set(available))
    if missing:
        raise ValueError(f"cpu_omp_threads_bind: CPUs {missing} are not available to this process")
    return cpus


def configure(spec: str, local_rank: int, local_size: int) -> list[int] | None:
    """Apply :func:`plan` to this process: its affinity, torch's thread count and each OpenMP thread's
    CPU (through the CPU kernels; without them the threads share the set unpinned)."""
    available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not available:
        return None
    cpus = plan(spec, local_rank, local_size, available)
    if cpus is None:
        if spec == "auto":
            # More workers than cores: one thread each, placed by the OS. Pinned, two ranks would share
            # a core while others had one each, and every tensor-parallel step waits for the slowest.
            torch.set_num_threads(1)
            logger.info(
                "CPU worker %d/%d: 1 thread, unpinned (more workers than cores)", local_rank, local_size
            )
        return None
    os.sched_setaffinity(0, cpus)
    torch.set_num_threads(len(cpus))
    pinned = _pin_threads(cpus)
    logger.info(
        "CPU worker %d/%d: %d OpenMP threads on CPUs %s%s",
        local_rank,
        local_size,
        len(cpus),
        cpus,
        "" if pinned else " (not pinned one to one: the CPU kernels are not built)",
    )
    return cpus


def _pin_threads(cpus: list[int]) -> bool:
    import ctypes

    from distgen.kernels import cpu_build

    lib = cpu_build.try_load()
    if lib is None:
        return False
    arr = (ctypes.c_int32 * len(cpus))(*cpus)
    lib.dg_bind_omp_threads.restype = ctypes.c_int64
    return lib.dg_bind_omp_threads(arr, ctypes.c_int64(len(cpus))) == 0
