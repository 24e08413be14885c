"""Linear layers on the CPU with their weights packed once, at load, for distgen's own GEMM
(``csrc/gemm.cpp``).

A plain ``F.linear`` hands the weight to the BLAS, which repacks it into its blocked layout on every
call: for the small activations of decode steps that repacking costs as much as the product. Packing
once into panels of 16 output features (float32 ``[N/16][K][16]``; bfloat16 ``[N/16][K/2][16][2]``, the
pairs AVX-512-BF16's dot product takes) leaves each call a stream through the weights. Measured on
the default model's shapes (``benchmarks/NOTES.md``) it matches or beats oneDNN's packed GEMM (the
layout PyTorch inductor's CPU freezing uses) from 1 to 1024 rows, and reads the weights at memory
bandwidth for a single row, where oneDNN's kernels reach two thirds of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgen.kernels import cpu_ops

PANEL = 16


@dataclass(frozen=True)
class PackedWeight:
    """A weight [out_features, in_features] in the GEMM's panel layout (a flat tensor)."""

    data: torch.Tensor
    out_features: int
    in_features: int


def packed_numel(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    panels = -(-out_features // PANEL)
    k = in_features + in_features % 2 if dtype == torch.bfloat16 else in_features
    return panels * PANEL * k


def pack(weight: torch.Tensor) -> PackedWeight | None:
    """The weight [out, in] packed for :func:`linear`, or None where the kernels cannot take it."""
    if weight.dim() != 2 or weight.dtype not in cpu_ops.DTYPES or weight.device.type != "cpu":
        return None
    n, k = weight.shape
    data = torch.empty(packed_numel(n, k, weight.dtype), dtype=weight.dtype)
    cpu_ops.pack_linear(data, weight.detach().contiguous(), n, k)
    return PackedWeight(data, n, k)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with W packed by :func:`pack`; x [..., in] of W's dtype."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight takes {packed.in_features}")
    out = x.new_empty(*x.shape[:-1], packed.out_features)
    cpu_ops.linear(out, x.contiguous(), packed.data, bias)
    return out
