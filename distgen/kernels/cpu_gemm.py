"""Linear layers on the CPU with their weights packed once, at load, for distgen's own GEMM
(``csrc/gemm.cpp``).

A plain ``F.linear`` hands the weight to the BLAS, which repacks it into its blocked layout on every
call: for the small activations of decode steps that repacking costs as much as the product. Packing
once into panels of 16 output features (float32 ``[N/16][K][16]``; bfloat16 ``[N/16][K/2][16][2]``, the
pairs AVX-512-BF16's dot product takes) leaves each call a stream through the weights. Measured on
the default model's shapes (``benchmarks/NOTES.md``) it beats oneDNN's packed GEMM (the layout PyTorch
inductor's CPU freezing uses) up to 64 rows, runs within about 10-15% of it at prefill sizes, and
reads the weights at memory bandwidth for a single row, where oneDNN's kernels reach two thirds of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distgen.kernels import cpu_ops

PANEL = 16


@dataclass(frozen=True)
class PackedWeight:
    """A weight [out_features, in_features] in the GEMM's panel layout (a flat tensor). ``gate_up``: a
    merged gate/up weight packed by :func:`pack_gate_up`, its gate and up panels in turns."""

    data: torch.Tensor
    out_features: int
    in_features: int
    gate_up: bool = False


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


def pack_gate_up(weight: torch.Tensor) -> PackedWeight | None:
    """A merged gate/up weight [2 I, in] packed for :func:`linear_silu`: gate rows ``16 p ..`` then up
    rows ``16 p ..``, panel after panel (each half padded to whole panels with zero rows), so that the
    GEMM's tiles of two panels hold a gate slice and its up slice together."""
    if weight.dim() != 2 or weight.shape[0] % 2:
        return None
    inter, k = weight.shape[0] // 2, weight.shape[1]
    p = -(-inter // PANEL)
    halves = weight.detach().new_zeros(2, p * PANEL, k)
    halves[:, :inter] = weight.detach().view(2, inter, k)
    packed = pack(halves.view(2, p, PANEL, k).transpose(0, 1).reshape(2 * p * PANEL, k))
    if packed is None:
        return None
    return PackedWeight(packed.data, 2 * inter, k, gate_up=True)


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` with W packed by :func:`pack` or :func:`pack_gate_up`; x [..., in] of W's
    dtype."""
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight takes {packed.in_features}")
    if packed.gate_up:  # the panels in turns, then back in gate-then-up order
        if bias is not None:
            raise ValueError("a gate/up weight packed in turns is for projections without a bias")
        inter = packed.out_features // 2
        p = -(-inter // PANEL)
        out = x.new_empty(*x.shape[:-1], 2 * p * PANEL)
        cpu_ops.linear(out, x.contiguous(), packed.data, None)
        out = out.view(-1, p, 2, PANEL).transpose(1, 2).reshape(-1, 2, p * PANEL)[:, :, :inter]
        return out.reshape(*x.shape[:-1], 2 * inter)
    out = x.new_empty(*x.shape[:-1], packed.out_features)
    cpu_ops.linear(out, x.contiguous(), packed.data, bias)
    return out


def linear_silu(x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
    """``silu(x @ G.T) * (x @ U.T)`` with the gate/up weight packed by :func:`pack_gate_up`: the
    product and the activation in one pass, bitwise what :func:`linear` and SiLU-and-mul give."""
    if not packed.gate_up:
        raise ValueError("linear_silu takes a weight packed by pack_gate_up")
    if x.shape[-1] != packed.in_features:
        raise ValueError(f"linear: input has {x.shape[-1]} features, the weight takes {packed.in_features}")
    out = x.new_empty(*x.shape[:-1], packed.out_features // 2)
    cpu_ops.linear_silu(out, x.contiguous(), packed.data)
    return out
