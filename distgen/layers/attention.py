"""Paged attention over the KV cache: the Triton kernels (CUDA), the CPU kernels, or plain batched
torch (the reference, and the CPU's fallback).

Which one runs is decided per step by the model runner through :mod:`distgen.kernels.dispatch`, and
recorded in the metadata (``path``): the torch path needs different metadata from the kernels'.

The cache of one layer is ``[2, num_blocks, Hkv, block_size, D]`` (head-major inside a block), so
reading a sequence's blocks back for one KV head is a gather of contiguous ``[block_size, D]`` tiles
and lands as a contiguous ``[B, Hkv, L, D]`` tensor, ready for SDPA without a transpose copy.

A layer may have a sliding window (a query sees itself and the ``window - 1`` keys before it, as
transformers' sliding-window mask says) and a logit soft-cap (``softcap * tanh(score / softcap)`` before
the softmax, Gemma 2). Every path honours both: the kernels take them as arguments and skip the blocks
wholly before a window; the torch path narrows the step's masks per window (each window's masks built
once per step, on the metadata) and computes soft-capped scores itself, as SDPA has no cap.

Every step the model runner lays the batch out as decode tokens first (one query each, shortest
context first), then the prefill chunks. :class:`AttentionMetadata` is built once per step and
shared by all layers. Gathered K/V land in a workspace kept across steps and layers:
allocating tens of MB per layer per step costs more in page faults than the copy itself on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from distgen.kernels.cpu_ops import check_head_map
from distgen.kernels.dispatch import cpu_kernels, triton_ops
from distgen.layers.norm import RMSNorm
from distgen.layers.rotary import RotaryEmbedding


@dataclass
class ContextRead:
    """Which cached tiles to read for a group of sequences, and how to mask them."""

    tile_index: torch.Tensor  # [b * Hkv * nb] rows of the cache viewed as [num_blocks * Hkv, bs, D]
    num_seqs: int
    length: int  # nb * block_size: every sequence of the group is padded to this
    mask: torch.Tensor  # bool, broadcastable to [b, H or Hkv, q, length]: True = attend


@dataclass
class AttentionMetadata:
    slot_block: torch.Tensor  # [T] block of each new token's slot
    slot_offset: torch.Tensor  # [T] offset inside the block
    num_decode: int
    num_prefill: int  # number of prefill sequences after the decodes
    # The torch path: decodes in groups of similar context length, each padded only to its own
    # longest context, and the prefill chunks' padding, reads and masks.
    decode_groups: list[tuple[int, int, ContextRead]] = field(default_factory=list)
    prefill_max_q: int = 0
    prefill_q_index: torch.Tensor | None = None  # [Tp] position of each prefill token in [Bp * max_q]
    prefill_context: ContextRead | None = None  # None when every prefill starts fresh (no cached context)
    prefill_mask: torch.Tensor | None = None  # [Bp, 1, max_q, max_q] for fresh prefills
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None  # flat K and V scratch, reused
    # The kernels' paths ("triton", "cpu"): per-row block tables and lengths instead of the reads above.
    path: str = "torch"
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32/int64 cache block ids per row
    seq_lens: torch.Tensor | None = None  # [B] context length per row, this step's tokens included
    prefill_query_start: torch.Tensor | None = None  # [Bp + 1] prefill rows' offsets from the first one
    query_start: torch.Tensor | None = None  # "cpu": [B + 1] every row's offsets (decodes included)
    # The torch path: the masks above narrowed to a sliding window, by (id of the mask, window).
    window_masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def windowed(self, mask: torch.Tensor, window: int | None) -> torch.Tensor:
        """``mask`` keeping, of each query's visible keys, only the last ``window``: every mask here
        lets a query see a prefix of the keys, so those are the keys with at most ``window`` visible
        keys at or after them."""
        if window is None:
            return mask
        key = (id(mask), window)
        if key not in self.window_masks:
            after = mask.flip(-1).cumsum(-1).flip(-1)
            self.window_masks[key] = mask & (after <= window)
        return self.window_masks[key]


class Attention(nn.Module):
    """Rotates this step's queries and keys by their positions (when the model has a rotary embedding),
    writes its K/V into the paged cache, then attends over each sequence's context."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        rotary: RotaryEmbedding | None = None,
        group: int | None = None,
        head_offset: int = 0,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        """Query head j reads KV head ``(j + head_offset) // group``; ``group`` defaults to
        ``num_heads // num_kv_heads``. A tensor-parallel rank whose query heads start or end inside a
        KV group (an uneven split, :class:`~distgen.layers.linear.HeadShard`) passes both.
        ``sliding_window`` (keys, the query's own included) and ``softcap``: None for none."""
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive number of keys, got {sliding_window}")
        if softcap is not None and softcap <= 0:
            raise ValueError(f"attention logit softcapping must be positive, got {softcap}")
        self.sliding_window, self.softcap = sliding_window, softcap
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = check_head_map(num_heads, num_kv_heads, group, head_offset)
        self.head_offset = head_offset
        # The torch and Triton paths take whole groups: a partial one is padded with zero queries
        # (whose outputs are dropped). Decode reads K/V once per group, so the padding costs little.
        self.padded_heads = num_kv_heads * self.group
        self.scale = scale
        self.rotary = rotary  # applied here, so that the Triton path can fuse it with the KV store
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, Hkv, block_size, D], bound by the runner

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        positions: torch.Tensor | None = None,
        qk_norm: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H * D]. If the layer has a rotary embedding, q and k are
        rotated here by ``positions`` [T], after the per-head norms ``qk_norm`` (Qwen3) if given."""
        assert self.kv_cache is not None, "KV cache not bound"
        assert (positions is None) == (self.rotary is None), "positions go with a rotary embedding"
        assert qk_norm is None or self.rotary is not None, "q/k norms are fused with the rotary embedding"
        t = q.shape[0]
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        if meta.path == "cpu":
            out = self._forward_cpu(q, k, v, positions, qk_norm, k_cache, v_cache, meta)
            return out.view(t, self.num_heads * self.head_dim)
        padded = self.padded_heads != self.num_heads
        if padded:
            q = pad_heads(q, self.padded_heads, self.head_offset)
        if meta.path == "triton":
            out = self._forward_triton(q, k, v, positions, qk_norm, k_cache, v_cache, meta)
        else:
            out = self._forward_torch(q, k, v, positions, qk_norm, k_cache, v_cache, meta)
        if padded:
            out = out[:, self.head_offset : self.head_offset + self.num_heads]
        return out.reshape(t, self.num_heads * self.head_dim)

    def _forward_torch(
        self, q, k, v, positions, qk_norm, k_cache, v_cache, meta: AttentionMetadata
    ) -> torch.Tensor:
        if qk_norm is not None:
            q, k = qk_norm[0](q), qk_norm[1](k)
        if self.rotary is not None:
            q, k = self.rotary(positions, q, k)
        write_kv(k_cache, v_cache, k, v, meta.slot_block, meta.slot_offset)
        out = torch.empty_like(q)
        nd = meta.num_decode
        if nd:
            self._decode(q[:nd], k_cache, v_cache, meta, out)
        if meta.num_prefill:
            out[nd:] = self._prefill(q[nd:], k[nd:], v[nd:], k_cache, v_cache, meta)
        return out

    def _forward_triton(
        self, q, k, v, positions, qk_norm, k_cache, v_cache, meta: AttentionMetadata
    ) -> torch.Tensor:
        ops = triton_ops()
        nd = meta.num_decode
        assert meta.block_tables is not None and meta.seq_lens is not None
        slots = (meta.slot_block, meta.slot_offset)
        if self.rotary is not None:
            cos, sin = self.rotary.cos, self.rotary.sin
            norm = {}
            if qk_norm is not None:
                assert qk_norm[0].eps == qk_norm[1].eps, "the fused q/k norms share one eps"
                norm = dict(qk_norm=(qk_norm[0].weight, qk_norm[1].weight), eps=qk_norm[0].eps)
            q = ops.rotary_store_kv(q, k, v, positions, cos, sin, k_cache, v_cache, *slots, **norm)
        else:
            ops.store_kv(k, v, k_cache, v_cache, *slots)
        out = torch.empty_like(q)
        if nd:
            tables, lens = meta.block_tables[:nd], meta.seq_lens[:nd]
            ops.paged_attention_decode(
                q[:nd], k_cache, v_cache, tables, lens, self.scale, out=out[:nd], **self._extras()
            )
        if meta.num_prefill:
            ops.paged_attention_prefill(
                q[nd:],
                k_cache,
                v_cache,
                meta.block_tables[nd:],
                meta.prefill_query_start,
                meta.seq_lens[nd:],
                self.scale,
                meta.prefill_max_q,
                out=out[nd:],
                **self._extras(),
            )
        return out

    def _extras(self) -> dict:
        return dict(window=self.sliding_window, softcap=self.softcap)

    def _forward_cpu(self, q, k, v, positions, qk_norm, k_cache, v_cache, meta: AttentionMetadata):
        """The CPU kernels: q/k norms and rotary fused with the KV store (q rotated in place), then
        one attention call over the whole step, reading K/V in place through the block tables. On
        this path the K half of the cache holds each block transposed (``cpu_ops.k_cache_view``)."""
        ops = cpu_kernels()
        rot = {}
        if self.rotary is not None:
            rot = dict(positions=positions, cos=self.rotary.cos, sin=self.rotary.sin)
            if qk_norm is not None:
                assert qk_norm[0].eps == qk_norm[1].eps, "the fused q/k norms share one eps"
                rot.update(qk_norm=(qk_norm[0].weight, qk_norm[1].weight), eps=qk_norm[0].eps)
        ops.rotary_store_kv(q, k, v, k_cache, v_cache, meta.slot_block, meta.slot_offset, **rot)
        assert meta.block_tables is not None and meta.seq_lens is not None and meta.query_start is not None
        return ops.paged_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start,
            self.scale,
            group=self.group,
            head_offset=self.head_offset,
            **self._extras(),
        )

    def _read(self, k_cache, v_cache, ctx: ContextRead, meta: AttentionMetadata):
        ws = meta.workspace
        k = read_context(k_cache, ctx, None if ws is None else ws[0])
        v = read_context(v_cache, ctx, None if ws is None else ws[1])
        return k, v

    def _decode(self, q, k_cache, v_cache, meta: AttentionMetadata, out: torch.Tensor) -> None:
        for start, end, ctx in meta.decode_groups:
            b = end - start
            k, v = self._read(k_cache, v_cache, ctx, meta)  # [b, Hkv, L, D]
            # Queries sharing a KV head ride in the "length" dim: [b, Hkv, group, D] against [b, Hkv, L, D].
            qg = q[start:end].view(b, self.num_kv_heads, self.group, self.head_dim)
            o = self._attend(qg, k, v, meta.windowed(ctx.mask, self.sliding_window))
            out[start:end] = o.view(b, self.num_kv_heads * self.group, self.head_dim)

    def _prefill(self, q, k_new, v_new, k_cache, v_cache, meta: AttentionMetadata) -> torch.Tensor:
        bp, mq, h, d = meta.num_prefill, meta.prefill_max_q, q.shape[1], self.head_dim
        ctx = meta.prefill_context
        if bp == 1 and ctx is None and self.sliding_window is None and self.softcap is None:
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
        if ctx is None:
            k = pad_tokens(k_new, meta.prefill_q_index, bp, mq).transpose(1, 2)
            v = pad_tokens(v_new, meta.prefill_q_index, bp, mq).transpose(1, 2)
            mask = meta.prefill_mask
        else:
            k, v = self._read(k_cache, v_cache, ctx, meta)
            mask = ctx.mask
        o = self._attend(qp, k, v, meta.windowed(mask, self.sliding_window))
        return o.transpose(1, 2).reshape(bp * mq, h, d)[meta.prefill_q_index]

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [b, H, n, D] over k/v [b, Hkv, L, D] with a boolean mask (True = attend)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return softcapped_attention(q, k, v, mask, self.scale, self.softcap)


def softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """Attention whose scores are soft-capped before the mask and the float32 softmax, as transformers'
    eager attention computes it: q [b, H, n, D] over k/v [b, Hkv, L, D]."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.tanh((q @ k.transpose(-1, -2)) * scale / softcap) * softcap
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def pad_heads(q: torch.Tensor, heads: int, offset: int) -> torch.Tensor:
    """q [T, H, D] as [T, heads, D] with its heads at ``offset`` and zeros around them."""
    out = q.new_zeros(q.shape[0], heads, q.shape[2])
    out[:, offset : offset + q.shape[1]] = q
    return out


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
) -> None:
    """Store new K/V [T, Hkv, D] at their slots of the paged cache [num_blocks, Hkv, block_size, D]."""
    k_cache[slot_block, :, slot_offset] = k.to(k_cache.dtype)
    v_cache[slot_block, :, slot_offset] = v.to(v_cache.dtype)


def tile_index(block_table: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Cache rows (viewed as [num_blocks * Hkv, bs, D]) of [B, nb] blocks, in (seq, head, block) order."""
    heads = torch.arange(num_kv_heads, device=block_table.device)
    return (block_table[:, None, :] * num_kv_heads + heads[None, :, None]).flatten()


def read_context(cache: torch.Tensor, ctx: ContextRead, workspace: torch.Tensor | None) -> torch.Tensor:
    """Gather a group's blocks: -> contiguous [b, Hkv, length, D], in the workspace when one is given."""
    _, hkv, bs, d = cache.shape
    tiles = cache.view(-1, bs, d)
    n = ctx.tile_index.numel()
    if workspace is None or workspace.numel() < n * bs * d:
        out = tiles.index_select(0, ctx.tile_index)
    else:
        out = workspace[: n * bs * d].view(n, bs, d)
        torch.index_select(tiles, 0, ctx.tile_index, out=out)
    return out.view(ctx.num_seqs, hkv, ctx.length, d)


def pad_tokens(x: torch.Tensor, index: torch.Tensor, b: int, max_len: int) -> torch.Tensor:
    """Scatter packed tokens [T, H, D] into a zero-padded [B, max_len, H, D]."""
    out = x.new_zeros(b * max_len, *x.shape[1:])
    out[index] = x
    return out.view(b, max_len, *x.shape[1:])
