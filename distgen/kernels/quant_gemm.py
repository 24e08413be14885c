"""The quantized linear layers' GEMM on the GPU, in Triton: ``y = x @ W.T + bias`` with W kept in its
block format (:mod:`distgen.kernels.quant`) and dequantized inside the product.

A program computes a ``BLOCK_M x BLOCK_N`` tile of y. It walks K one quantization block of 32 at a
time: loads the x tile, the codes of ``BLOCK_N`` output features and their per-block scales (and
minimums), dequantizes them to float32 in registers and adds their product with ``tl.dot``. The
weights cross memory at their stored width (0.56 to 1.06 bytes each). Its reference is
:func:`distgen.kernels.reference.quant_linear_ref` (dequantize, then multiply).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distgen.kernels.quant import BLOCK, FORMAT_ID, QuantizedWeight, padded

BLOCK_M = 16
BLOCK_N = 32


@triton.jit
def _quant_linear_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    mins_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K,
    code_stride,
    scale_stride,
    FMT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QBLOCK: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    e = tl.arange(0, QBLOCK)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if FMT == 3:  # int8: one float32 scale per output row
        row_scale = tl.load(scales_ptr + cols, mask=col_ok, other=0.0)
    for b in range(0, tl.cdiv(K, QBLOCK)):
        k = b * QBLOCK + e
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
            mask=row_ok[:, None] & (k[None, :] < K),
            other=0.0,
        ).to(tl.float32)
        code_row = codes_ptr + cols[:, None].to(tl.int64) * code_stride
        if FMT == 0 or FMT == 3:  # int8 codes
            q = tl.load(code_row + k[None, :], mask=col_ok[:, None], other=0).to(tl.float32)
        else:  # byte j of a block: element j in the low nibble, j + 16 in the high one
            byte = tl.load(code_row + b * (QBLOCK // 2) + (e % (QBLOCK // 2))[None, :], mask=col_ok[:, None])
            q = ((byte.to(tl.int32) >> ((e // (QBLOCK // 2)) * 4)[None, :]) & 15).to(tl.float32)
        if FMT == 3:
            w = q * row_scale[:, None]
        else:
            d = tl.load(scales_ptr + cols * scale_stride + b, mask=col_ok, other=0.0).to(tl.float32)
            if FMT == 0:
                w = q * d[:, None]
            elif FMT == 1:
                w = d[:, None] * (q - 8.0)
            else:
                m = tl.load(mins_ptr + cols * scale_stride + b, mask=col_ok, other=0.0).to(tl.float32)
                w = d[:, None] * q + m[:, None]
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def quant_linear_triton(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T + bias`` for x [..., in] and a quantized W on x's device; a new tensor of x's dtype."""
    k, n = qw.in_features, qw.out_features
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    assert qw.codes.is_contiguous() and qw.scales.is_contiguous() and qw.codes.shape[0] == n
    assert padded(k) % BLOCK == 0
    if m and n:
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        mins = qw.mins if qw.mins is not None else qw.scales
        _quant_linear_kernel[grid](
            x2,
            qw.codes,
            qw.scales,
            mins,
            bias if bias is not None else out,
            out,
            m,
            n,
            k,
            qw.codes.stride(0),
            qw.scales.stride(0),
            FMT=FORMAT_ID[qw.fmt],
            HAS_BIAS=bias is not None,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            QBLOCK=BLOCK,
        )
    return out.view(*x.shape[:-1], n)
