"""RMSNorm with an optional fused residual add: the Triton kernel on CUDA, the CPU kernel on the CPU,
plain torch (their reference, :mod:`distgen.kernels.reference`) otherwise (see
:mod:`distgen.kernels.dispatch`)."""

from __future__ import annotations

import torch
from torch import nn

from distgen.kernels.dispatch import cpu_kernels, triton_ops, use_cpu_kernels, use_triton
from distgen.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with ``residual``: ``(norm(x + residual), x + residual)``. On the CPU
        kernels' path the two results are written over ``x`` and ``residual``."""
        if use_triton(x):
            if residual is None:
                return triton_ops().rmsnorm(x, self.weight, self.eps)
            return triton_ops().fused_add_rmsnorm(x, residual, self.weight, self.eps)
        if use_cpu_kernels(x) and x.is_contiguous() and self.weight.dtype == x.dtype:
            if residual is None:
                return cpu_kernels().rms_norm(x, self.weight, self.eps)
            if residual.is_contiguous():  # both are this step's own buffers: updated in place
                return cpu_kernels().fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return rmsnorm_ref(x, self.weight, self.eps)
        return fused_add_rmsnorm_ref(x, residual, self.weight, self.eps)
