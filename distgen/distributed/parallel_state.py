"""The tensor-parallel group, the pipeline stages, and their collectives, behind one small interface.

Layers call :func:`tp_rank`, :func:`tp_size`, :func:`all_reduce` and :func:`gather` and never
touch ``torch.distributed`` directly. Until :func:`init_parallel_groups` runs (one worker, the ``uni``
executor) the group has size one and every collective is the identity.

With pipeline parallelism the world of ``tp * pp`` ranks is cut into stages: global rank r is TP rank
``r % tp`` of stage ``r // tp``. Each stage's ranks form a TP group of their own; TP rank t of one
stage sends its hidden states to TP rank t of the next (:func:`send_to_next`, :func:`recv_from_prev`).
The driver, which samples, is TP rank 0 of the last stage.

The backend is NCCL on CUDA and gloo on the CPU (:func:`default_backend`); the interface is the same.
A group of one rank is created only when asked for with an ``init_method`` (tests of the backend).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from distgen.kernels.cpu_record import call_recorded

logger = logging.getLogger("distgen")


@dataclass(frozen=True)
class _TPGroup:
    rank: int
    size: int
    group: object | None  # a torch.distributed ProcessGroup when size > 1
    first: int = 0  # the global rank of this group's TP rank 0 (collectives name ranks globally)


@dataclass(frozen=True)
class _Pipeline:
    stage: int = 0
    size: int = 1
    tp: int = 1  # the global rank distance between one stage's rank and the next stage's
    layers: tuple[int, ...] | None = None  # layers per stage; None: as even as they split


_STATE: dict[str, object] = {"tp": _TPGroup(0, 1, None), "pp": _Pipeline()}


def default_backend(device: str) -> str:
    """``nccl`` for a CUDA device, ``gloo`` otherwise."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_parallel_groups(
    rank: int, tp: int, pp: int, init_method: str, backend: str, layers: tuple[int, ...] | None = None
) -> None:
    """Join the world of ``tp * pp`` ranks, its TP group and its stage (every worker calls this once);
    ``layers``: how many layers each stage holds (see :func:`stage_layers`).

    With one rank and no ``init_method`` no process group is made and collectives are the identity.
    """
    world = tp * pp
    if world == 1 and not init_method:
        _STATE["tp"], _STATE["pp"] = _TPGroup(0, 1, None), _Pipeline()
        return
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world)
    stage = rank // tp
    if pp == 1:
        group = dist.group.WORLD
    else:
        # Every rank creates every stage's group, in the same order, as new_group requires.
        groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
        group = groups[stage] if tp > 1 else None
    _STATE["tp"] = _TPGroup(rank % tp, tp, group, stage * tp)
    _STATE["pp"] = _Pipeline(stage, pp, tp, layers)
    logger.debug("rank %d/%d: TP rank %d of stage %d/%d (%s)", rank, world, rank % tp, stage, pp, backend)


def destroy_parallel_groups() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE["tp"], _STATE["pp"] = _TPGroup(0, 1, None), _Pipeline()


def tp_rank() -> int:
    return _tp().rank


def tp_size() -> int:
    return _tp().size


def pp_stage() -> int:
    return _pp().stage


def pp_size() -> int:
    return _pp().size


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """(start, size) of part ``index`` when ``n`` items are split into ``parts`` contiguous parts as
    evenly as possible: the first ``n % parts`` parts take one more."""
    base, extra = divmod(n, parts)
    return index * base + min(index, extra), base + (index < extra)


def stage_layers(num_layers: int) -> tuple[int, int]:
    """(first layer, number of layers) of this rank's stage: the configured partition, or the layers
    split as evenly as they go."""
    p = _pp()
    if p.layers is None:
        return split_range(num_layers, p.size, p.stage)
    return sum(p.layers[: p.stage]), p.layers[p.stage]


def is_first_stage() -> bool:
    return _pp().stage == 0


def is_last_stage() -> bool:
    p = _pp()
    return p.stage == p.size - 1


def is_driver() -> bool:
    """TP rank 0 of the last stage: the rank that samples and answers the executor."""
    return is_last_stage() and tp_rank() == 0


def _tp() -> _TPGroup:
    g = _STATE["tp"]
    assert isinstance(g, _TPGroup)
    return g


def _pp() -> _Pipeline:
    p = _STATE["pp"]
    assert isinstance(p, _Pipeline)
    return p


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group, in place."""
    g = _tp()
    if g.group is not None:  # a recorded CPU decode step replays it (kernels/cpu_record.py)
        call_recorded(_all_reduce_tp, x)
    return x


def _all_reduce_tp(x: torch.Tensor) -> None:
    # The group is looked up at each call: a replay outlives a group rebuilt when a worker is replaced.
    dist.all_reduce(x, group=_tp().group)


def gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate each rank's ``x`` along ``dim`` on rank 0; other ranks get None."""
    g = _tp()
    if g.group is None:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(g.size)] if g.rank == 0 else None
    dist.gather(x, parts, dst=g.first, group=g.group)
    return torch.cat(parts, dim=dim) if parts is not None else None


def broadcast(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``x`` on every rank, in place (the others pass a buffer of the same shape and dtype)."""
    g = _tp()
    if g.group is not None:
        dist.broadcast(x, src=g.first, group=g.group)
    return x


def send_to_next(tensors: list[torch.Tensor]) -> None:
    """This stage's output to the same TP rank of the next stage (in order; the receiver knows the
    shapes from the step both run)."""
    p, g = _pp(), _tp()
    dst = (p.stage + 1) * p.tp + g.rank
    for t in tensors:
        dist.send(t.contiguous(), dst)


def recv_from_prev(
    shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """The previous stage's output, as :func:`send_to_next` sent it."""
    p, g = _pp(), _tp()
    src = (p.stage - 1) * p.tp + g.rank
    out = []
    for shape in shapes:
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src)
        out.append(t)
    return out
