"""Paged-attention decode kernel (Triton) and its plain-torch reference.

One query token per sequence attends over that sequence's cached K/V, stored in the paged layout of
:mod:`distgen.layers.attention`: ``k_cache``/``v_cache`` are ``[num_blocks, Hkv, block_size, D]``
(head-major inside a block) and ``block_tables[b, i]`` is the cache block holding tokens
``i * block_size .. (i + 1) * block_size - 1`` of sequence ``b``.

The kernel runs one program per (sequence, KV head, split). The program loads the ``H // Hkv`` query
heads that share that KV head (padded to a power of two), then walks its share of the sequence's
blocks with an online softmax, accumulating in float32, so each K/V tile is read from memory once per
group rather than once per query head. With one split (large batches) it writes the output; with
several (small batches, where ``B * Hkv`` programs would leave most of the GPU idle and each would walk
a long context alone) every split covers a contiguous range of the blocks and leaves its unnormalised
partial result, and a second kernel combines the splits per (sequence, head). The split count depends
only on ``B`` and ``Hkv``, so a captured CUDA graph stays valid for any context length.
With a sliding window the splits share only the blocks that hold the window's keys, and the scores may
be soft-capped (``softcap * tanh(score / softcap)``) before the softmax.
Scores and the weighted sum use broadcast-and-reduce rather than ``tl.dot``
so any group size, block size and head dim work, on the GPU and in the interpreter alike.

Triton is imported lazily: on a CPU-only machine set ``TRITON_INTERPRET=1`` before the first call
(before triton is imported anywhere) to run the kernel in the interpreter.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


def check_cache_shapes(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, q_layout: str
) -> tuple[int, int, int, int]:
    """Shape checks shared by the paged-attention kernels; return (H, Hkv, block_size, D)."""
    assert q.dim() == 3, f"q must be {q_layout}, got {tuple(q.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches must be [num_blocks, Hkv, bs, D]"
    _, h, d = q.shape
    _, hkv, bs, dk = k_cache.shape
    assert dk == d, f"head_dim mismatch: q {d}, cache {dk}"
    assert h % hkv == 0, f"num_heads {h} not a multiple of num_kv_heads {hkv}"
    return h, hkv, bs, d


def _check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[int, int, int, int, int]:
    """Validate shapes; return (B, H, Hkv, block_size, D)."""
    h, hkv, bs, d = check_cache_shapes(q, k_cache, v_cache, "[B, H, D]")
    b = q.shape[0]
    assert block_tables.dim() == 2 and block_tables.shape[0] == b, "block_tables must be [B, max_blocks]"
    assert seq_lens.shape == (b,), "seq_lens must be [B]"
    return b, h, hkv, bs, d


def paged_attention_decode_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Plain-torch reference of :func:`paged_attention_decode`, one sequence at a time.

    For each sequence, gathers its blocks into dense ``[Hkv, L, D]`` K/V, keeps the first
    ``seq_lens[b]`` tokens, repeats each KV head for its ``H // Hkv`` query heads and computes
    ``softmax(q k^T * scale) v`` in float32 over the last ``window`` tokens (all without one), the
    scores soft-capped first when ``softcap`` is given. Returns ``[B, H, D]`` in ``q.dtype``.
    """
    b, h, hkv, bs, d = _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    group = h // hkv
    out = torch.empty_like(q)
    for i in range(b):
        n = int(seq_lens[i])
        nb = (n + bs - 1) // bs
        blocks = block_tables[i, :nb].long()
        # [nb, Hkv, bs, D] -> [Hkv, nb * bs, D] -> first n tokens.
        k = k_cache[blocks].transpose(0, 1).reshape(hkv, nb * bs, d)[:, :n].float()
        v = v_cache[blocks].transpose(0, 1).reshape(hkv, nb * bs, d)[:, :n].float()
        k = k.repeat_interleave(group, dim=0)  # [H, n, D]: query head j uses KV head j // group
        v = v.repeat_interleave(group, dim=0)
        lo = max(0, n - window) if window else 0
        k, v = k[:, lo:], v[:, lo:]
        scores = torch.einsum("hd,hnd->hn", q[i].float(), k) * scale
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        probs = torch.softmax(scores, dim=-1)
        out[i] = torch.einsum("hn,hnd->hd", probs, v).to(q.dtype)
    return out


@functools.cache
def _kernel() -> Any:
    """Build (once) the Triton kernel; deferred so importing this module never needs triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_attention_decode_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        bt_ptr,
        lens_ptr,
        out_ptr,
        acc_part_ptr,
        m_part_ptr,
        l_part_ptr,
        scale,
        window,
        softcap,
        stride_qb,
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
        stride_ob,
        stride_oh,
        stride_od,
        block_size,
        head_dim,
        GROUP: tl.constexpr,
        GROUP_P2: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HEAD_DIM_P2: tl.constexpr,
        NUM_SPLITS: tl.constexpr,
        SOFTCAP: tl.constexpr,
    ):
        seq = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        offs_g = tl.arange(0, GROUP_P2)
        offs_t = tl.arange(0, BLOCK_T)
        offs_d = tl.arange(0, HEAD_DIM_P2)
        d_ok = offs_d < head_dim
        head_ok = offs_g < GROUP
        heads = kvh * GROUP + offs_g

        q_ptrs = q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=head_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # [G, D]
        q = q * scale

        seq_len = tl.load(lens_ptr + seq)
        num_blocks = tl.cdiv(seq_len, block_size)
        lo = tl.maximum(seq_len - window, 0)  # the window's first key
        first_block = lo // block_size
        per_split = tl.cdiv(num_blocks - first_block, NUM_SPLITS)
        first = first_block + split * per_split
        last = tl.minimum(first + per_split, num_blocks)

        m_i = tl.full([GROUP_P2], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_P2], dtype=tl.float32)
        acc = tl.zeros([GROUP_P2, HEAD_DIM_P2], dtype=tl.float32)

        for i in range(first, last):
            block = tl.load(bt_ptr + seq * stride_btb + i * stride_btn).to(tl.int64)
            pos = i * block_size + offs_t
            tok_ok = (offs_t < block_size) & (pos < seq_len) & (pos >= lo)  # [T]
            kv_mask = tok_ok[:, None] & d_ok[None, :]
            k_ptrs = (
                k_ptr
                + block * stride_kn
                + kvh * stride_kh
                + offs_t[:, None] * stride_kt
                + offs_d[None, :] * stride_kd
            )
            v_ptrs = (
                v_ptr
                + block * stride_vn
                + kvh * stride_vh
                + offs_t[:, None] * stride_vt
                + offs_d[None, :] * stride_vd
            )
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [T, D]

            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, T]
            if SOFTCAP:  # softcap * tanh(s / softcap); tanh(x) = 1 - 2 / (exp(2x) + 1), exact at both ends
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            s = tl.where(tok_ok[None, :], s, float("-inf"))
            # Every visited block holds at least one valid token, so m_new is finite from block 0 on.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])  # [G, T]
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m_i = m_new

        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i > 0.0, l_i, 1.0)  # seq_len 0 -> zeros rather than NaN
            o = acc / l_safe[:, None]
            o_ptrs = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od
            tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])
        else:
            # Partials [B, H, NUM_SPLITS] (and [.., D]); an empty split leaves m = -inf, l = 0, acc = 0.
            part = (seq * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
            tl.store(m_part_ptr + part, m_i, mask=head_ok)
            tl.store(l_part_ptr + part, l_i, mask=head_ok)
            a_ptrs = acc_part_ptr + part[:, None].to(tl.int64) * head_dim + offs_d[None, :]
            tl.store(a_ptrs, acc, mask=head_ok[:, None] & d_ok[None, :])

    return _paged_attention_decode_kernel


@functools.cache
def _combine_kernel() -> Any:
    """Build (once) the kernel that merges the splits' partial softmax results."""
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_splits_kernel(
        acc_part_ptr,
        m_part_ptr,
        l_part_ptr,
        out_ptr,
        stride_ob,
        stride_oh,
        stride_od,
        head_dim,
        NUM_SPLITS: tl.constexpr,
        HEAD_DIM_P2: tl.constexpr,
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, NUM_SPLITS)
        offs_d = tl.arange(0, HEAD_DIM_P2)
        d_ok = offs_d < head_dim
        part = (seq * tl.num_programs(1) + head) * NUM_SPLITS + offs_s
        m = tl.load(m_part_ptr + part)
        l_s = tl.load(l_part_ptr + part)
        # Split 0 always holds the first block, so the max is finite and empty splits weigh 0.
        m_max = tl.max(m, axis=0)
        w = tl.exp(m - m_max)
        total = tl.sum(w * l_s, axis=0)
        a_ptrs = acc_part_ptr + part[:, None].to(tl.int64) * head_dim + offs_d[None, :]
        acc = tl.load(a_ptrs, mask=d_ok[None, :], other=0.0)
        o = tl.sum(w[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
        o_ptrs = out_ptr + seq * stride_ob + head * stride_oh + offs_d * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=d_ok)

    return _combine_splits_kernel


NO_WINDOW = 1 << 30  # the window passed for "none": longer than any context


def next_power_of_2(n: int) -> int:
    """Without importing triton (launch configs are computed on CPU-only machines too)."""
    return 1 << max(n - 1, 0).bit_length()


def num_splits_for(batch: int, num_kv_heads: int) -> int:
    """Splits per sequence: enough programs to cover the GPU's ~132 SMs about once, in powers of two
    up to 16; one (no combine step) from ``batch * num_kv_heads >= 128`` on."""
    programs = batch * num_kv_heads
    if programs >= 128:
        return 1
    return min(16, next_power_of_2(-(-128 // programs)))


def launch_config(group: int, block_size: int, head_dim: int) -> dict[str, int]:
    """Padded tile sizes (the compile-time constants besides GROUP) and warps."""
    return dict(
        GROUP_P2=next_power_of_2(group),
        BLOCK_T=next_power_of_2(block_size),
        HEAD_DIM_P2=next_power_of_2(head_dim),
        num_warps=4,
    )


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache, in Triton.

    Args:
        q: ``[B, H, D]``, one query token per sequence.
        k_cache, v_cache: ``[num_blocks, Hkv, block_size, D]``; ``H % Hkv == 0``; any block size
            and head dim (tiles are padded to powers of two and masked).
        block_tables: ``[B, max_blocks]`` int32/int64 cache block ids of each sequence.
        seq_lens: ``[B]`` int32/int64 number of valid cached tokens of each sequence (including the
            current one, already written to the cache); at least 1.
        scale: softmax scale applied to ``q . k``.
        out: optional ``[B, H, D]`` destination (e.g. a slice of a larger buffer).
        num_splits: context splits per sequence, a power of two; ``None`` picks
            :func:`num_splits_for` of ``B`` and ``Hkv``.
        window: attend only to the last ``window`` tokens (a sliding window); None for all.
        softcap: scores become ``softcap * tanh(score / softcap)`` before the softmax; None for none.

    Returns:
        ``[B, H, D]`` in ``q.dtype``; accumulation is float32.
    """
    b, h, hkv, bs, d = _check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    group = h // hkv
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape, f"out {tuple(out.shape)} must have q's shape {tuple(q.shape)}"
    if b == 0:
        return out
    if seq_lens.dtype not in (torch.int32, torch.int64) or seq_lens.device != q.device:
        seq_lens = seq_lens.to(device=q.device, dtype=torch.int32)
    seq_lens = seq_lens.contiguous()
    block_tables = block_tables.to(q.device)
    splits = num_splits_for(b, hkv) if num_splits is None else num_splits
    assert splits >= 1 and splits & (splits - 1) == 0, f"num_splits {splits} must be a power of 2"
    cfg = launch_config(group, bs, d)
    if splits > 1:
        acc_part = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
        m_part = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    else:
        acc_part = m_part = l_part = out  # unused
    _kernel()[(b, hkv, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        acc_part,
        m_part,
        l_part,
        float(scale),
        window or NO_WINDOW,
        float(softcap or 1.0),
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
        bs,
        d,
        GROUP=group,
        NUM_SPLITS=splits,
        SOFTCAP=softcap is not None,
        **cfg,
    )
    if splits > 1:
        _combine_kernel()[(b, h)](
            acc_part, m_part, l_part, out, *out.stride(), d, NUM_SPLITS=splits, HEAD_DIM_P2=cfg["HEAD_DIM_P2"]
        )
    return out
