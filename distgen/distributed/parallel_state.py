"""The tensor-parallel group and its collectives, behind one small interface.

Layers call :func:`tp_rank`, :func:`tp_size`, :func:`all_reduce` and :func:`gather` and never
touch ``torch.distributed`` directly. Until :func:`init_tp_group` runs (one worker, the ``uni``
executor) the group has size one and every collective is the identity.

The backend is NCCL on CUDA and gloo on the CPU (:func:`default_backend`); the interface is the same.
A group of one rank is created only when asked for with an ``init_method`` (tests of the backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger("distgen")


@dataclass(frozen=True)
class _TPGroup:
    rank: int
    size: int
    group: object | None  # a torch.distributed ProcessGroup when size > 1


_STATE = {"tp": _TPGroup(0, 1, None)}


def default_backend(device: str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_tp_group(rank: int, world_size: int, init_method: str, backend: str) -> None:
    """Join the tensor-parallel group (every worker calls this once at start).

    With one rank and no ``init_method`` no process group is made and collectives are the identity.
    """
    if world_size > 1 or init_method:
        dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size)
        group = dist.group.WORLD
    else:
        group = None
    _STATE["tp"] = _TPGroup(rank, world_size, group)
    logger.debug("rank %d/%d joined the TP group (%s)", rank, world_size, backend)


def destroy_tp_group() -> None:
    if _STATE["tp"].group is not None and dist.is_initialized():
        dist.destroy_process_group()
    _STATE["tp"] = _TPGroup(0, 1, None)


def tp_rank() -> int:
    return _STATE["tp"].rank


def tp_size() -> int:
    return _STATE["tp"].size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group, in place."""
    if _STATE["tp"].group is not None:
        dist.all_reduce(x, group=_STATE["tp"].group)
    return x


def gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate each rank's ``x`` along ``dim`` on rank 0; other ranks get None."""
    g = _STATE["tp"]
    if g.group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(g.size)] if g.rank == 0 else None
    dist.gather(x, parts, dst=0, group=g.group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank, in place (the others pass a buffer of the same shape and dtype)."""
    g = _STATE["tp"]
    if g.group is not None:
        dist.broadcast(x, src=0, group=g.group)
    return x
