"""Store new K/V into the paged cache as a Triton kernel (one program per token), plus a torch reference.

Same semantics as :func:`distgen.layers.attention.write_kv`: ``k``/``v`` [T, Hkv, D] land, cast to the
cache dtype, at ``cache[slot_block[t], :, slot_offset[t], :]`` of caches ``[num_blocks, Hkv, block_size,
D]``. The caches are written in place; nothing is returned.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_heads(
    src_ptr,
    src_s1,
    dst_ptr,
    dst_s1,
    n_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Copy ``n_heads`` rows of ``head_dim`` from ``src`` to ``dst`` (head strides given), cast to dst's
    dtype: one token's K or V into its cache slot."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < head_dim)
    x = tl.load(src_ptr + heads * src_s1 + dims, mask=mask)
    tl.store(dst_ptr + heads * dst_s1 + dims, x.to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    blk_ptr,
    off_ptr,
    k_s0,
    k_s1,
    v_s0,
    v_s1,
    kc_s0,
    kc_s1,
    kc_s2,
    vc_s0,
    vc_s1,
    vc_s2,
    n_heads,
    head_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    blk = tl.load(blk_ptr + tok).to(tl.int64)
    off = tl.load(off_ptr + tok).to(tl.int64)
    kc = kc_ptr + blk * kc_s0 + off * kc_s2
    vc = vc_ptr + blk * vc_s0 + off * vc_s2
    _store_heads(k_ptr + tok * k_s0, k_s1, kc, kc_s1, n_heads, head_dim, BLOCK_H, BLOCK_D)
    _store_heads(v_ptr + tok * v_s0, v_s1, vc, vc_s1, n_heads, head_dim, BLOCK_H, BLOCK_D)


def last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def check_cache_args(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
) -> None:
    """The shapes a KV store needs: ``k``/``v`` [T, Hkv, D], caches [num_blocks, Hkv, block_size, D]."""
    t, hkv, d = k.shape
    assert v.shape == k.shape, "k and v must have the same shape"
    assert k_cache.shape[1] == hkv and k_cache.shape[3] == d and v_cache.shape == k_cache.shape
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "cache head dim must be contiguous"
    assert slot_block.shape == (t,) and slot_offset.shape == (t,), "slots must be [T]"


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
) -> None:
    """Write ``k``/``v`` [T, Hkv, D] in place into the caches [num_blocks, Hkv, block_size, D]."""
    check_cache_args(k, v, k_cache, v_cache, slot_block, slot_offset)
    t, hkv, d = k.shape
    if not t:
        return
    k, v = last_dim_contiguous(k), last_dim_contiguous(v)
    _store_kv_kernel[(t,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_block.contiguous(),
        slot_offset.contiguous(),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        hkv,
        d,
        BLOCK_H=triton.next_power_of_2(hkv),
        BLOCK_D=triton.next_power_of_2(d),
    )


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
) -> None:
    """Plain-torch reference of :func:`store_kv`."""
    for t in range(k.shape[0]):
        b, o = int(slot_block[t]), int(slot_offset[t])
        k_cache[b, :, o] = k[t].to(k_cache.dtype)
        v_cache[b, :, o] = v[t].to(v_cache.dtype)
