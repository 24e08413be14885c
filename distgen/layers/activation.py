"""Activations: the Triton kernel on CUDA, the CPU kernel on the CPU, plain torch (their reference,
:mod:`distgen.kernels.reference`) otherwise (see :mod:`distgen.kernels.dispatch`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgen.kernels.dispatch import cpu_kernels, triton_ops, use_cpu_kernels, use_triton
from distgen.kernels.reference import silu_and_mul_ref


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for a merged [.., 2 * I] gate/up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            return triton_ops().silu_and_mul(x)
        if use_cpu_kernels(x) and x.is_contiguous():
            return cpu_kernels().silu_and_mul(x)
        return silu_and_mul_ref(x)


class GeluTanhAndMul(nn.Module):
    """``gelu_tanh(gate) * up`` for a merged [.., 2 * I] gate/up projection (Gemma's
    ``gelu_pytorch_tanh``), in the input's dtype as transformers computes it; plain torch on every
    path (no kernel of its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
