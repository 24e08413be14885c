"""RMSNorm (optionally fused with the residual add) as a Triton kernel, plus plain-torch references.

Same semantics as :class:`distgen.layers.norm.RMSNorm`: the statistics are taken in float32, the
normalised row is rounded to the input dtype, then multiplied by the weight; with a residual, the sum
``x + residual`` (rounded to the input dtype) is both normalised and returned as the new residual.
One program handles one row; ``BLOCK`` is the next power of two of the hidden size. The kernels are
out of place: inputs are never modified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    x_stride,
    res_stride,
    out_stride,
    new_res_stride,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    dtype = x.dtype
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        tl.store(new_res_ptr + row * new_res_stride + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    var = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(var + eps)).to(dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,), f"weight {tuple(weight.shape)} does not match hidden {hidden}"
    x2 = _rows(x)
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        assert residual.shape == x.shape, "residual must have the shape of x"
        r2 = _rows(residual.to(x.dtype))
        new_res = torch.empty_like(out)
    else:
        r2, new_res = x2, out  # unused placeholders
    n_rows = x2.shape[0]
    if n_rows:
        _rmsnorm_kernel[(n_rows,)](
            x2,
            r2,
            weight.contiguous(),
            out,
            new_res,
            x2.stride(0),
            r2.stride(0),
            out.stride(0),
            new_res.stride(0),
            hidden,
            float(eps),
            HAS_RESIDUAL=residual is not None,
            BLOCK=triton.next_power_of_2(hidden),
        )
    out = out.view(x.shape)
    return out, (new_res.view(x.shape) if residual is not None else None)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * rmsnorm(x)`` over the last dim of ``x`` [..., hidden]; returns a new tensor of x.dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rmsnorm(x + residual), x + residual)``, both new tensors of x.dtype (inputs untouched)."""
    out, new_res = _launch(x, residual, weight, eps)
    assert new_res is not None
    return out, new_res
