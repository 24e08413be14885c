"""Rotary position embedding (NeoX / "rotate half" layout) as a Triton kernel, plus a torch reference.

Same semantics as :class:`distgen.layers.rotary.RotaryEmbedding`: with ``x = cat(x1, x2)`` split in
halves along the head dim, ``out = cat(x1 * cos - x2 * sin, x2 * cos + x1 * sin)``, computed in
float32 and rounded to the input dtype. ``cos``/``sin`` are the caches ``[max_pos, head_dim / 2]``.
One program rotates all heads of q and k of one token. The kernel is out of place: it returns new
contiguous tensors and never modifies ``q`` or ``k`` (which may be strided views, e.g. of a fused QKV).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(
    src_ptr,
    dst_ptr,
    src_s0,
    src_s1,
    dst_s0,
    dst_s1,
    tok,
    n_heads,
    cos,
    sin,
    half,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate the ``n_heads`` heads of token ``tok`` from ``src`` into ``dst`` (float32 math)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < half)
    src = src_ptr + tok * src_s0 + heads * src_s1 + dims
    dst = dst_ptr + tok * dst_s0 + heads * dst_s1 + dims
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + half, mask=mask, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    tl.store(dst, (x1f * cos - x2f * sin).to(dst_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + half, (x2f * cos + x1f * sin).to(dst_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    q_out_ptr,
    k_out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_s0,
    q_s1,
    k_s0,
    k_s1,
    qo_s0,
    qo_s1,
    ko_s0,
    ko_s1,
    cs_s0,
    n_q_heads,
    n_k_heads,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)[None, :]
    cmask = dims < half
    cos = tl.load(cos_ptr + pos * cs_s0 + dims, mask=cmask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * cs_s0 + dims, mask=cmask, other=0.0).to(tl.float32)
    _rotate_heads(
        q_ptr, q_out_ptr, q_s0, q_s1, qo_s0, qo_s1, tok, n_q_heads, cos, sin, half, BLOCK_HQ, BLOCK_D
    )
    _rotate_heads(
        k_ptr, k_out_ptr, k_s0, k_s1, ko_s0, ko_s1, tok, n_k_heads, cos, sin, half, BLOCK_HK, BLOCK_D
    )


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] by ``positions`` [T]; returns new (q, k) tensors."""
    t, h, d = q.shape
    hkv = k.shape[1]
    assert k.shape == (t, hkv, d) and d % 2 == 0, f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)}"
    assert positions.shape == (t,), "positions must be [T]"
    half = d // 2
    assert cos.shape == sin.shape and cos.shape[-1] == half, "cos/sin caches must be [max_pos, D/2]"
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if t:
        _rotary_kernel[(t,)](
            q,
            k,
            q_out,
            k_out,
            positions.contiguous(),
            cos,
            sin,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            q_out.stride(0),
            q_out.stride(1),
            k_out.stride(0),
            k_out.stride(1),
            cos.stride(0),
            h,
            hkv,
            half,
            BLOCK_HQ=triton.next_power_of_2(h),
            BLOCK_HK=triton.next_power_of_2(hkv),
            BLOCK_D=triton.next_power_of_2(half),
        )
    return q_out, k_out


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch reference of :func:`apply_rotary`."""
    c = cos[positions].float().unsqueeze(1)
    s = sin[positions].float().unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)
