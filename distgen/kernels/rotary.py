"""Rotary position embedding (NeoX / "rotate half" layout) fused with the KV-cache store, as one Triton
kernel, plus a torch reference.

The rotation has the semantics of :class:`distgen.layers.rotary.RotaryEmbedding`: with ``x = cat(x1,
x2)`` split in halves along the head dim, ``out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``,
computed in float32. ``cos``/``sin`` are the caches ``[max_pos, head_dim / 2]``. The store has those of
:func:`distgen.kernels.kv_store.store_kv`.

Attention needs the rotated keys only in the paged cache (both attention kernels read K from there),
so one program per token rotates all query heads into a new tensor, rotates the key heads straight
into the token's cache slot and copies its value heads next to them: one launch where rotary and the
store took two, and no rotated-K tensor. Qwen3's RMSNorm over each query and key head before the
rotation rides along (``qk_norm``), saving two more launches and the copies that normalising strided
heads on their own needs. ``q``/``k``/``v`` may be strided views (e.g. of a fused QKV) and are never
modified.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distgen.kernels.kv_store import _store_heads, check_cache_args, last_dim_contiguous, store_kv_ref
from distgen.kernels.reference import rmsnorm_ref, rotate_ref


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    w_ptr,
    src_s1,
    dst_s1,
    n_heads,
    cos,
    sin,
    half,
    eps,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate one token's ``n_heads`` heads from ``src`` into ``dst`` (each the token's base, heads
    ``s1`` apart: a row of q, or a cache slot), in float32 math rounded to dst's dtype. With
    ``HAS_NORM`` each head is first RMS-normalised over its ``2 * half`` dims and scaled by ``w``,
    rounded to src's dtype as :class:`distgen.layers.norm.RMSNorm` rounds."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    src = src_ptr + heads * src_s1 + dims
    dst = dst_ptr + heads * dst_s1 + dims
    x1f = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2f = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        dtype = src_ptr.dtype.element_ty
        var = (tl.sum(x1f * x1f, axis=1) + tl.sum(x2f * x2f, axis=1)) / (2 * half)
        r = tl.rsqrt(var + eps)[:, None]
        w1 = tl.load(w_ptr + dims, mask=dims < half, other=0.0).to(tl.float32)
        w2 = tl.load(w_ptr + half + dims, mask=dims < half, other=0.0).to(tl.float32)
        x1f = (w1 * (x1f * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        x2f = (w2 * (x2f * r).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    tl.store(dst, (x1f * cos - x2f * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2f * cos + x1f * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_store_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    kc_ptr,
    vc_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    blk_ptr,
    off_ptr,
    qw_ptr,
    kw_ptr,
    q_s0,
    q_s1,
    k_s0,
    k_s1,
    v_s0,
    v_s1,
    qo_s0,
    qo_s1,
    kc_s0,
    kc_s1,
    kc_s2,
    vc_s0,
    vc_s1,
    vc_s2,
    cs_s0,
    n_q_heads,
    n_kv_heads,
    half,
    eps,
    HAS_NORM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    blk = tl.load(blk_ptr + tok).to(tl.int64)
    off = tl.load(off_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cmask = dims < half
    cos = tl.load(cos_ptr + pos * cs_s0 + dims, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cs_s0 + dims, mask=cmask, other=0.0).to(tl.float32)
    q, q_out = q_ptr + tok * q_s0, q_out_ptr + tok * qo_s0
    k, k_slot = k_ptr + tok * k_s0, kc_ptr + blk * kc_s0 + off * kc_s2
    v, v_slot = v_ptr + tok * v_s0, vc_ptr + blk * vc_s0 + off * vc_s2
    _rotate_heads(q, q_out, qw_ptr, q_s1, qo_s1, n_q_heads, cos, sin, half, eps, HAS_NORM, BLOCK_HQ, BLOCK_D)
    _rotate_heads(
        k, k_slot, kw_ptr, k_s1, kc_s1, n_kv_heads, cos, sin, half, eps, HAS_NORM, BLOCK_HK, BLOCK_D
    )
    _store_heads(v, v_s1, v_slot, vc_s1, n_kv_heads, 2 * half, BLOCK_HK, 2 * BLOCK_D)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] by ``positions`` [T]; write the rotated ``k`` and ``v``
    into the caches [num_blocks, Hkv, block_size, D] at the token slots; return the rotated ``q``.

    ``qk_norm``: the weights [D] of an RMSNorm (with ``eps``) over each query and each key head, applied
    before the rotation (Qwen3)."""
    t, h, d = q.shape
    hkv = k.shape[1]
    assert k.shape == (t, hkv, d) and d % 2 == 0, f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)}"
    check_cache_args(k, v, k_cache, v_cache, slot_block, slot_offset)
    assert positions.shape == (t,), "positions must be [T]"
    half = d // 2
    assert cos.shape == sin.shape and cos.shape[-1] == half, "cos/sin caches must be [max_pos, D/2]"
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if qk_norm is not None:
        assert all(w.shape == (d,) for w in qk_norm), f"q/k norm weights must be [{d}]"
        q_w, k_w = (w.contiguous() for w in qk_norm)
    else:
        q_w = k_w = q_out  # unused
    if t:
        _rotary_store_kernel[(t,)](
            q,
            k,
            v,
            q_out,
            k_cache,
            v_cache,
            positions.contiguous(),
            cos,
            sin,
            slot_block.contiguous(),
            slot_offset.contiguous(),
            q_w,
            k_w,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            cos.stride(0),
            h,
            hkv,
            half,
            float(eps),
            HAS_NORM=qk_norm is not None,
            BLOCK_HQ=triton.next_power_of_2(h),
            BLOCK_HK=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(half),
        )
    return q_out


def rotary_store_kv_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
    qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Plain-torch reference of :func:`rotary_store_kv`: the rotated keys go from float32 to the cache
    dtype directly, rounded once."""
    if qk_norm is not None:
        q, k = rmsnorm_ref(q, qk_norm[0], eps), rmsnorm_ref(k, qk_norm[1], eps)
    store_kv_ref(rotate_ref(k, positions, cos, sin), v, k_cache, v_cache, slot_block, slot_offset)
    return rotate_ref(q, positions, cos, sin).to(q.dtype)
