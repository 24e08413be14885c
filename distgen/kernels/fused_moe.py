"""Mixture-of-experts expert computation as grouped GEMMs over expert-sorted token blocks (Triton).

Each token picks ``top_k`` experts, giving ``T * top_k`` (token, expert) pairs. :func:`align_block_size`
sorts the pairs by expert and pads each expert's group to a multiple of ``BLOCK_M``, so that every
block of ``BLOCK_M`` sorted pairs belongs to one expert; padding slots hold the id ``T * top_k`` (no
pair) and are masked. It is plain torch with no host sync: the buffers are sized by the worst case,
``T * top_k + min(T * top_k, E) * (BLOCK_M - 1)`` slots, and blocks past the last expert's group are
tagged with expert ``E`` and return at once. That keeps the whole path capturable in a CUDA graph.

The GEMM kernel runs one program per (block of sorted pairs, tile of ``BLOCK_N`` output features): it
gathers the block's input rows (the token's row of ``x`` for the gate/up GEMM, the pair's own row for
the down GEMM), multiplies them by the block's expert weight over K in tiles of ``BLOCK_K`` with float32
accumulators, optionally scales each row by its routing weight, and scatters the rows to the pairs'
slots. :func:`fused_moe` chains gate/up GEMM, SiLU-and-mul and the weighted down GEMM (its output in
float32), then sums each token's ``top_k`` rows and rounds once. Float32 inputs use IEEE float32 dots.

The reference is :func:`distgen.kernels.reference.fused_moe_ref`. Triton is imported lazily, so this
module (and :func:`align_block_size`) imports without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch


def align_block_size(
    topk_ids: torch.Tensor, block_m: int, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted pair ids [slots] int32, expert of each block [slots / block_m] int32).

    Pair ``p`` is token ``p // top_k``'s ``p % top_k``-th choice. Each expert's pairs keep their order,
    padded to whole blocks with the id ``num_pairs``; blocks past the last group have expert
    ``num_experts``.
    """
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    slots = num_pairs + min(num_pairs, num_experts) * (block_m - 1)
    num_blocks = -(-slots // block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    first = torch.cumsum(counts, 0) - counts  # each expert's first index among the sorted pairs
    dest = (ends - padded)[expert_of] + torch.arange(num_pairs, device=device) - first[expert_of]
    sorted_ids = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(ends, block_start, right=True).to(torch.int32)
    return sorted_ids, block_expert


@functools.cache
def _kernel() -> Any:
    """Build (once) the Triton kernel; deferred so importing this module never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr,
        b_ptr,
        c_ptr,
        weights_ptr,
        sorted_ptr,
        expert_ptr,
        n,
        k,
        num_pairs,
        num_experts,
        stride_a,
        stride_be,
        stride_bn,
        stride_c,
        ROWS_PER_A: tl.constexpr,
        MUL_WEIGHT: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        block = tl.program_id(0)
        expert = tl.load(expert_ptr + block).to(tl.int64)
        if expert >= num_experts:
            return
        pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        row_ok = pairs < num_pairs
        a_rows = pairs // ROWS_PER_A
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        offs_k = tl.arange(0, BLOCK_K)
        b_base = b_ptr + expert * stride_be + cols[None, :].to(tl.int64) * stride_bn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < k
            a = tl.load(
                a_ptr + a_rows[:, None] * stride_a + kk[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            b = tl.load(b_base + kk[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            if IEEE_DOT:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        if MUL_WEIGHT:
            w = tl.load(weights_ptr + pairs, mask=row_ok, other=0.0)
            acc = acc * w[:, None]
        c_ptrs = c_ptr + pairs[:, None] * stride_c + cols[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return _moe_gemm_kernel


# The interpreter's tl.dot gives garbage for 16-bit operands (see distgen.kernels.paged_prefill): there
# they are upcast to float32 first.
@functools.cache
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(num_pairs: int, num_experts: int) -> dict[str, int]:
    """Tile sizes: blocks of 16 pairs when an expert's group is small (decode), 64 when the groups
    average 64 pairs or more; 64 output features by 32 of K, 4 warps."""
    block_m = 64 if num_pairs >= 64 * num_experts else 16
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=32, num_warps=4)


def _gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    weights: torch.Tensor,
    sorted_ids: torch.Tensor,
    block_expert: torch.Tensor,
    rows_per_a: int,
    mul_weight: bool,
    cfg: dict[str, int],
) -> None:
    """``out[p] = a[p // rows_per_a] @ w[expert of p].T`` (times pair p's weight if ``mul_weight``)."""
    num_experts, n, k = w.shape
    grid = (block_expert.numel(), -(-n // cfg["BLOCK_N"]))
    _kernel()[grid](
        a,
        w,
        out,
        weights,
        sorted_ids,
        block_expert,
        n,
        k,
        out.shape[0],
        num_experts,
        a.stride(0),
        w.stride(0),
        w.stride(1),
        out.stride(0),
        ROWS_PER_A=rows_per_a,
        MUL_WEIGHT=mul_weight,
        IEEE_DOT=a.dtype == torch.float32,
        UPCAST=_interpreting(),
        **cfg,
    )


def fused_moe(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """The routed experts' weighted sum for each token of ``x`` [T, H] (see ``fused_moe_ref`` for the
    layouts of ``w13`` [E, 2 * I, H] and ``w2`` [E, H, I]); a new [T, H] tensor of x.dtype."""
    from distgen.kernels.activation import silu_and_mul

    t, hidden = x.shape
    num_experts = w13.shape[0]
    top_k = topk_ids.shape[1]
    if t == 0:
        return x.new_zeros(0, hidden)
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    weights = topk_weights.float().reshape(-1).contiguous()
    cfg = launch_config(t * top_k, num_experts)
    sorted_ids, block_expert = align_block_size(topk_ids, cfg["BLOCK_M"], num_experts)
    gate_up = torch.empty(t * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    _gemm(x, w13, gate_up, weights, sorted_ids, block_expert, top_k, False, cfg)
    act = silu_and_mul(gate_up)
    down = torch.empty(t * top_k, hidden, dtype=torch.float32, device=x.device)
    _gemm(act, w2, down, weights, sorted_ids, block_expert, 1, True, cfg)
    return down.view(t, top_k, hidden).sum(dim=1).to(x.dtype)
