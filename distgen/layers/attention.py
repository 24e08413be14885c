"""Paged attention over the KV cache, in plain batched torch (the CPU path and the kernels' reference).

Every step the model runner lays the batch out as decode tokens first (one query each), then the
prefill chunks. :class:`AttentionMetadata` is built once per step and shared by all layers:
it holds where each new token's K/V goes in the cache (``slot_mapping``) and, per group, the block
tables and masks needed to read the cached context back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each new token
    num_decode: int  # the first num_decode tokens are single-token decodes
    decode_block_table: torch.Tensor | None  # [Bd, nb]
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nb*bs] bool: slot holds a real token
    num_prefill: int  # number of prefill sequences after the decodes
    prefill_max_q: int
    prefill_q_index: torch.Tensor | None  # [Tp] position of each prefill token in [Bp * max_q]
    prefill_block_table: torch.Tensor | None  # [Bp, nb]; None when no prefill has cached context
    prefill_mask: torch.Tensor | None  # [Bp, 1, max_q, L] bool (causal + lengths)


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends over each sequence's context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = scale
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, Hkv, D], bound by the runner

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]."""
        assert self.kv_cache is not None, "KV cache not bound"
        t = q.shape[0]
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = q.new_empty(t, self.num_heads, self.head_dim)
        nd = meta.num_decode
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, meta)
        if meta.num_prefill:
            out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta)
        return out.view(t, self.num_heads * self.head_dim)

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        b = q.shape[0]
        k = gather_kv(k_cache, meta.decode_block_table)  # [B, Hkv, L, D]
        v = gather_kv(v_cache, meta.decode_block_table)
        # Queries of one KV group ride in the "length" dim: [B, Hkv, group, D] against [B, Hkv, L, D].
        qg = q.view(b, self.num_kv_heads, self.group, self.head_dim)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=meta.decode_mask, scale=self.scale)
        return o.reshape(b, self.num_heads, self.head_dim)

    def _prefill(self, q, k_new, v_new, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        bp, mq, h, d = meta.num_prefill, meta.prefill_max_q, self.num_heads, self.head_dim
        if bp == 1 and meta.prefill_block_table is None:
            # One fresh prompt chunk: plain causal attention on the new K/V, nothing to read back.
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0),
                k_new.transpose(0, 1).unsqueeze(0),
                v_new.transpose(0, 1).unsqueeze(0),
                is_causal=True,
                scale=self.scale,
                enable_gqa=True,
            )
            return o[0].transpose(0, 1)
        qp = pad_tokens(q, meta.prefill_q_index, bp, mq).transpose(1, 2)  # [Bp, H, mq, D]
        if meta.prefill_block_table is None:
            k = pad_tokens(k_new, meta.prefill_q_index, bp, mq).transpose(1, 2)
            v = pad_tokens(v_new, meta.prefill_q_index, bp, mq).transpose(1, 2)
        else:
            k = gather_kv(k_cache, meta.prefill_block_table)
            v = gather_kv(v_cache, meta.prefill_block_table)
        o = F.scaled_dot_product_attention(
            qp, k, v, attn_mask=meta.prefill_mask, scale=self.scale, enable_gqa=True
        )
        return o.transpose(1, 2).reshape(bp * mq, h, d)[meta.prefill_q_index]


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store new K/V [T, Hkv, D] at their slots of the paged cache [num_blocks, block_size, Hkv, D]."""
    hkv, d = k_cache.shape[-2:]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """Read whole blocks back: [num_blocks, bs, Hkv, D] x [B, nb] -> [B, Hkv, nb * bs, D] (a strided view)."""
    b, nb = block_table.shape
    _, bs, hkv, d = cache.shape
    return cache[block_table].view(b, nb * bs, hkv, d).transpose(1, 2)


def pad_tokens(x: torch.Tensor, index: torch.Tensor, b: int, max_len: int) -> torch.Tensor:
    """Scatter packed tokens [T, H, D] into a zero-padded [B, max_len, H, D]."""
    out = x.new_zeros(b * max_len, *x.shape[1:])
    out[index] = x
    return out.view(b, max_len, *x.shape[1:])
