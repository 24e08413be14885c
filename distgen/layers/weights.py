"""Helpers that let a ``weight_loader`` read only its rank's slice.

A checkpoint hands each loader either a ``torch.Tensor`` (GGUF, already dequantized) or a lazy
safetensors slice (``safe_open(...).get_slice(name)``), which reads from disk only the part that
is indexed. These helpers treat both alike.
"""

from __future__ import annotations

from typing import Any

import torch

LoadedWeight = Any  # torch.Tensor | safetensors PySafeSlice


def shape_of(w: LoadedWeight) -> tuple[int, ...]:
    return tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w.get_shape())


def narrow(w: LoadedWeight, dim: int, start: int, size: int) -> LoadedWeight:
    if isinstance(w, torch.Tensor):
        return w.narrow(dim, start, size)
    index: list[slice] = [slice(None)] * len(w.get_shape())
    index[dim] = slice(start, start + size)
    return w[tuple(index)]


def materialize(w: LoadedWeight) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else w[:]


def copy_into(param: torch.Tensor, w: LoadedWeight, what: str) -> None:
    """Copy ``w`` into ``param`` after checking shapes; ``what`` names the weight in errors."""
    t = materialize(w)
    if tuple(t.shape) != tuple(param.shape):
        raise ValueError(
            f"weight {what}: checkpoint shape {tuple(t.shape)} does not fit the "
            f"parameter shape {tuple(param.shape)}"
        )
    with torch.no_grad():
        param.copy_(t)


def default_weight_loader(param: torch.nn.Parameter, w: LoadedWeight, shard_id: Any = None) -> None:
    copy_into(param.data, w, getattr(param, "name_hint", "?"))
