"""Rotary position embedding (the "rotate half" / NeoX layout that Hugging Face Llama uses).

This module is the torch path. On the Triton path :class:`distgen.layers.attention.Attention` applies
the rotation itself, fused with the KV-cache store (:mod:`distgen.kernels.rotary`), from the same
``cos``/``sin`` caches."""

from __future__ import annotations

import math

import torch
from torch import nn

from distgen.kernels.reference import rotate_ref


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


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        if rope_type == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
        elif rope_type != "default":
            raise ValueError(f"rope scaling type {rope_type!r} is not supported (default, llama3)")
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos(), persistent=False)  # [max_pos, head_dim/2]
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] by their positions [T]."""
        rotated_q = rotate_ref(q, positions, self.cos, self.sin).to(q.dtype)
        return rotated_q, rotate_ref(k, positions, self.cos, self.sin).to(k.dtype)
