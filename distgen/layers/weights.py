"""Helpers that let a ``weight_loader`` read only its rank's slice.

A checkpoint hands each loader a ``torch.Tensor`` (a GGUF tensor dequantized at load), a lazy
safetensors slice (``safe_open(...).get_slice(name)``), which reads from disk only the part that
is indexed, or a :class:`~distgen.kernels.quant.QuantizedWeight` (a linear weight kept quantized,
which narrows only along whole blocks). These helpers treat them alike.
"""

from __future__ import annotations

from typing import Any

import torch

from distgen.kernels.quant import QuantizedWeight

LoadedWeight = Any  # torch.Tensor | safetensors PySafeSlice | QuantizedWeight


def shape_of(w: LoadedWeight) -> tuple[int, ...]:
    return tuple(w.shape) if isinstance(w, (torch.Tensor, QuantizedWeight)) else tuple(w.get_shape())


def narrow(w: LoadedWeight, dim: int, start: int, size: int) -> LoadedWeight:
    if isinstance(w, (torch.Tensor, QuantizedWeight)):
        return w.narrow(dim, start, size)
    index: list[slice] = [slice(None)] * len(w.get_shape())
    index[dim] = slice(start, start + size)
    return w[tuple(index)]


def materialize(w: LoadedWeight) -> torch.Tensor:
    if isinstance(w, QuantizedWeight):  # a parameter that stays float (an embedding, a norm)
        from distgen.kernels.quant import dequantize

        return dequantize(w)
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


class _RowView:
    """Rows ``start .. start + size`` of a lazy safetensors slice, itself lazy: indexing it reads only
    the rows asked for (a part of a fused checkpoint tensor, such as q of a stacked qkv)."""

    def __init__(self, w: Any, start: int, size: int) -> None:
        self.w, self.start, self.size = w, start, size

    def get_shape(self) -> list[int]:
        return [self.size, *list(self.w.get_shape())[1:]]

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first, *rest = index or (slice(None),)
        lo, hi, step = first.indices(self.size)
        if step != 1:
            raise ValueError("a row view reads contiguous rows only")
        return self.w[(slice(self.start + lo, self.start + hi), *rest)]


def row_part(w: LoadedWeight, start: int, size: int) -> LoadedWeight:
    """Rows ``start .. start + size`` of ``w``, as lazy as ``w`` is."""
    if isinstance(w, (torch.Tensor, QuantizedWeight)):
        return w.narrow(0, start, size)
    return _RowView(w, start, size)
