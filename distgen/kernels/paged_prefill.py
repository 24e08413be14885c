"""Paged-attention prefill / chunked-prefill kernel (Triton) and its plain-torch reference.

Each sequence brings a chunk of ``q_len`` new query tokens, already written to the paged cache
(layout of :mod:`distgen.layers.attention`: ``[num_blocks, Hkv, block_size, D]``, ``block_tables[b, i]``
holds tokens ``i * block_size ..`` of sequence ``b``). The chunk follows ``seq_len - q_len`` tokens
cached by earlier steps (a prefix-cache hit or an earlier chunk), so query ``j`` of the chunk sits at
position ``seq_len - q_len + j`` and attends to every cached position up to and including its own.

Queries are packed: sequence ``b`` owns rows ``query_start[b] .. query_start[b + 1] - 1`` of ``q``.

The kernel runs one program per (sequence, KV head, tile of ``BLOCK_M`` queries). A program stacks
the tile's queries of the ``H // Hkv`` heads sharing the KV head into ``BLOCK_M * GROUP_P2`` rows, so
each K/V tile is loaded once for the whole group, and walks the context in tiles of ``BLOCK_N``
positions with an online softmax (float32 accumulators, ``tl.dot`` for both products). The positions
of a K/V tile are looked up one by one in the block table, so any block size works, and tiles past
the tile's last query position are never visited, nor, with a sliding window, tiles wholly before the
tile's first query's window. Scores may be soft-capped (``softcap * tanh(score / softcap)``) before
the softmax. Float32 inputs use IEEE float32 dots (no tf32).

Triton is imported lazily, as in :mod:`distgen.kernels.paged_attention`.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch

from distgen.kernels.paged_attention import NO_WINDOW, check_cache_shapes, next_power_of_2


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate shapes; return (B, H, Hkv, block_size, D)."""
    h, hkv, bs, d = check_cache_shapes(q, k_cache, v_cache, "[T, H, D]")
    b = seq_lens.shape[0]
    assert seq_lens.dim() == 1 and query_start.shape == (b + 1,), "need seq_lens [B] and query_start [B+1]"
    assert block_tables.dim() == 2 and block_tables.shape[0] == b, "block_tables must be [B, max_blocks]"
    return b, h, hkv, bs, d


def paged_attention_prefill_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-torch reference of :func:`paged_attention_prefill`, one sequence at a time, in float32.

    Gathers each sequence's first ``seq_lens[b]`` cached tokens into dense K/V, repeats each KV head
    for its query heads and applies the causal mask shifted by the cached prefix length (narrowed to
    the last ``window`` positions when given; scores soft-capped first when ``softcap`` is).
    Returns ``[T, H, D]`` in ``q.dtype``.
    """
    b, h, hkv, bs, d = _check_inputs(q, k_cache, v_cache, block_tables, query_start, seq_lens)
    group = h // hkv
    out = torch.empty_like(q)
    for i in range(b):
        lo, hi, n = int(query_start[i]), int(query_start[i + 1]), int(seq_lens[i])
        if hi == lo:
            continue
        nb = (n + bs - 1) // bs
        blocks = block_tables[i, :nb].long()
        k = k_cache[blocks].transpose(0, 1).reshape(hkv, nb * bs, d)[:, :n].float()
        v = v_cache[blocks].transpose(0, 1).reshape(hkv, nb * bs, d)[:, :n].float()
        k = k.repeat_interleave(group, dim=0)  # [H, n, D]
        v = v.repeat_interleave(group, dim=0)
        qi = q[lo:hi].float().transpose(0, 1)  # [H, q_len, D]
        q_pos = torch.arange(hi - lo) + (n - (hi - lo))
        visible = torch.arange(n)[None, :] <= q_pos[:, None]  # [q_len, n]
        if window:
            visible &= torch.arange(n)[None, :] > q_pos[:, None] - window
        scores = (qi @ k.transpose(1, 2)) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out[lo:hi] = (probs @ v).transpose(0, 1).to(q.dtype)
    return out


@functools.cache
def _kernel() -> Any:
    """Build (once) the Triton kernel; deferred so importing this module never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_attention_prefill_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        qs_ptr,
        lens_ptr,
        out_ptr,
        qk_scale,
        softcap,
        window,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kh,
        stride_kt,
        stride_kd,
        stride_vn,
        stride_vh,
        stride_vt,
        stride_vd,
        stride_btb,
        stride_btn,
        stride_ot,
        stride_oh,
        stride_od,
        head_dim,
        block_size,
        GROUP: tl.constexpr,
        GROUP_P2: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM_P2: tl.constexpr,
        IEEE_DOT: tl.constexpr,
        UPCAST: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        tile = tl.program_id(2)
        q_start = tl.load(qs_ptr + seq)
        q_len = tl.load(qs_ptr + seq + 1) - q_start
        if tile * BLOCK_M < q_len:
            seq_len = tl.load(lens_ptr + seq)
            cached = seq_len - q_len  # tokens before this chunk's first query
            rows = tl.arange(0, BLOCK_M * GROUP_P2)
            m = tile * BLOCK_M + rows // GROUP_P2  # query index inside the chunk
            g = rows % GROUP_P2
            row_ok = (m < q_len) & (g < GROUP)
            q_pos = cached + m
            offs_d = tl.arange(0, HEAD_DIM_P2)
            d_ok = offs_d < head_dim
            tok = (q_start + m).to(tl.int64)
            heads = kvh * GROUP + g
            q_ptrs = (
                q_ptr + tok[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
            )
            q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)

            m_i = tl.full([BLOCK_M * GROUP_P2], float("-inf"), dtype=tl.float32)
            l_i = tl.zeros([BLOCK_M * GROUP_P2], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M * GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)
            # Keys past the tile's last query position are masked for every row: stop before them.
            kv_end = tl.minimum(cached + (tile + 1) * BLOCK_M, seq_len)
            # Keys before the tile's first query's window are masked for every row: start after them.
            kv_lo = tl.maximum(cached + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
            for start in range(kv_lo, kv_end, BLOCK_N):
                n = start + tl.arange(0, BLOCK_N)
                n_ok = n < kv_end
                blk = tl.load(bt_ptr + seq * stride_btb + (n // block_size) * stride_btn, mask=n_ok, other=0)
                blk = blk.to(tl.int64)
                slot = (n % block_size).to(tl.int64)
                kv_mask = n_ok[:, None] & d_ok[None, :]
                k_ptrs = (
                    k_ptr
                    + blk[:, None] * stride_kn
                    + kvh * stride_kh
                    + slot[:, None] * stride_kt
                    + offs_d[None, :] * stride_kd
                )
                v_ptrs = (
                    v_ptr
                    + blk[:, None] * stride_vn
                    + kvh * stride_vh
                    + slot[:, None] * stride_vt
                    + offs_d[None, :] * stride_vd
                )
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)  # [N, D]
                v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                if IEEE_DOT:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                visible = (n[None, :] <= q_pos[:, None]) & (n[None, :] > q_pos[:, None] - window)
                visible = visible & n_ok[None, :]
                s = s * qk_scale
                if SOFTCAP:  # in log2 units (softcap too); tanh(x) = 1 - 2 / (exp(2x) + 1)
                    s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
                s = tl.where(visible, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                # A row may see none of a tile's keys (outside its window) before it has seen any:
                # its max is still -inf, and 0 stands in for it so that nothing turns NaN.
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp2(m_i - m_use)
                p = tl.exp2(s - m_use[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                if IEEE_DOT:
                    pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

            o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # padded rows may have seen nothing
            o_ptrs = (
                out_ptr + tok[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            )
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    return _paged_attention_prefill_kernel


_LOG2E = 1.4426950408889634


# The interpreter's tl.dot gives garbage for bfloat16/float16 operands (seen with triton 3.9): there
# the operands are upcast to float32 first; compiled kernels keep 16-bit dots with float32 accumulators.
@functools.cache
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(group: int, head_dim: int, max_query_len: int, cuda: bool) -> dict[str, int]:
    """Tile sizes and warps. About 64 stacked (query, head) rows per program, at least 16 for
    ``tl.dot``; K/V tiles of 64 positions up to head dim 64, 32 above, and 8 warps: at head dim 128
    the 4-warp or 64-position variants spill registers on sm_90 (``tests/kernels/aot_compile.py``)."""
    group_p2 = next_power_of_2(group)
    head_dim_p2 = max(16, next_power_of_2(head_dim))
    block_m = max(16 // group_p2, min(64 // group_p2, next_power_of_2(max_query_len)), 1)
    return dict(
        GROUP_P2=group_p2,
        BLOCK_M=block_m,
        BLOCK_N=(64 if head_dim_p2 <= 64 else 32) if cuda else 16,
        HEAD_DIM_P2=head_dim_p2,
        num_warps=8,
    )


def paged_attention_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    out: torch.Tensor | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of packed query chunks over a paged KV cache, in Triton.

    Args:
        q: ``[T, H, D]``, the chunks of all sequences back to back (see ``query_start``).
        k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]`` with this step's tokens already stored;
            ``H % Hkv == 0``. Any block size and head dim.
        block_tables: ``[B, max_blocks]`` int32/int64 cache block ids of each sequence.
        query_start: ``[B + 1]`` int offsets of each sequence's chunk in ``q`` (``query_start[0] == 0``).
        seq_lens: ``[B]`` context length of each sequence including its chunk (cached prefix + chunk).
        scale: softmax scale applied to ``q . k``.
        max_query_len: the longest chunk (a host int: it sizes the launch grid without a device sync).
        out: optional ``[T, H, D]`` destination (e.g. a slice of a larger buffer).
        window: each query attends only to the last ``window`` positions up to its own; None for all.
        softcap: scores become ``softcap * tanh(score / softcap)`` before the softmax; None for none.

    Returns:
        ``[T, H, D]`` in ``q.dtype``; accumulation is float32.
    """
    b, h, hkv, bs, d = _check_inputs(q, k_cache, v_cache, block_tables, query_start, seq_lens)
    group = h // hkv
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape, f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}"
    if b == 0 or q.shape[0] == 0 or max_query_len == 0:
        return out
    cfg = launch_config(group, d, max_query_len, q.is_cuda)
    grid = (b, hkv, -(-max_query_len // cfg["BLOCK_M"]))
    _kernel()[grid](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start,
        seq_lens,
        out,
        float(scale) * _LOG2E,
        float(softcap or 1.0) * _LOG2E,
        window or NO_WINDOW,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        d,
        bs,
        GROUP=group,
        IEEE_DOT=q.dtype == torch.float32,
        UPCAST=_interpreting(),
        SOFTCAP=softcap is not None,
        **cfg,
    )
    return out
