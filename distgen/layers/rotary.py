"""Rotary position embedding (the "rotate half" / NeoX layout that Hugging Face Llama uses).

This module is the torch path. On the Triton path :class:`distgen.layers.attention.Attention` applies
the rotation itself, fused with the KV-cache store (:mod:`distgen.kernels.rotary`), from the same
``cos``/``sin`` caches."""

from __future__ import annotations

import math

import torch
from torch import nn


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _longrope_tables(
    shape: torch.Tensor, base: float, max_position: int, scaling: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """LongRoPE's cos/sin (Phi-3): each frequency divided by its short or long factor, both scaled by
    the attention factor, as transformers' ``_compute_longrope_parameters`` computes them.

    transformers picks one factor set per forward call: the long one when that call's largest position
    + 1 exceeds ``original_max_position_embeddings``. Here the choice is a function of the position
    alone (long from that position on), baked into the table, so that it never depends on batching,
    chunking or prefix-cache hits. The two agree for every token whenever the prompt fits in the
    original length (decoding past it included); for a longer prompt transformers rotates its first
    positions with the long factors too, and distgen with the short ones."""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_position / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    freqs = []
    for name, span in (("short_factor", (0, original)), ("long_factor", (original, max_position))):
        ext = torch.tensor(scaling[name], dtype=torch.float32)
        if ext.numel() != shape.numel():
            raise ValueError(f"rope scaling {name} has {ext.numel()} entries, not {shape.numel()}")
        inv_freq = 1.0 / (ext * base**shape)
        t = torch.arange(*span, dtype=torch.float32) if span[0] < span[1] else torch.empty(0)
        freqs.append(torch.outer(t, inv_freq))
    f = torch.cat(freqs)[:max_position]
    return f.cos() * attention, f.sin() * attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[max_position, head_dim / 2]``: pair ``i`` rotates dims ``i`` and ``i + head_dim/2``.

    With ``rotary_dim < head_dim`` (a partial rotary) only the first ``rotary_dim / 2`` pairs turn; the
    others have cos 1 and sin 0. A model whose checkpoint rotates its first ``rotary_dim`` dims
    (transformers' layout) permutes its q/k rows so that they land on those pairs."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict | None = None,
        rotary_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        dim = rotary_dim or head_dim
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        if rope_type == "longrope":
            cos, sin = _longrope_tables(shape, base, max_position, scaling or {})
        else:
            inv_freq = 1.0 / (base**shape)
            if rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
            elif rope_type != "default":
                msg = f"rope scaling type {rope_type!r} is not supported (default, llama3, longrope)"
                raise ValueError(msg)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            cos, sin = freqs.cos(), freqs.sin()
        if dim < head_dim:  # the dims that do not turn: cos 1, sin 0
            rest = (max_position, (head_dim - dim) // 2)
            cos, sin = torch.cat((cos, torch.ones(rest)), 1), torch.cat((sin, torch.zeros(rest)), 1)
        self.register_buffer("cos", cos.contiguous(), persistent=False)  # [max_pos, head_dim/2]
        self.register_buffer("sin", sin.contiguous(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] by their positions [T]."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
