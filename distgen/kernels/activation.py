"""``silu(gate) * up`` of a merged gate/up projection as one Triton kernel, plus a torch reference.

The input ``x [.., 2 * I]`` holds ``gate`` in its first half and ``up`` in its second (the layout of
:class:`distgen.layers.linear.MergedColumnParallelLinear`). Torch needs two launches and a rounded
intermediate (``silu``, then the product); the kernel reads both halves once, computes in float32 and
rounds once to the input dtype. A program handles ``BLOCK`` columns of one row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` [..., 2 * I]; a new tensor of x.dtype."""
    assert x.shape[-1] % 2 == 0, f"the last dim must hold gate and up halves, got {x.shape[-1]}"
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] and inter:
        grid = (x2.shape[0], triton.cdiv(inter, BLOCK))
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=BLOCK)
    return out.view(*x.shape[:-1], inter)
