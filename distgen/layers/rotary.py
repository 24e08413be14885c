"""Rotary position embedding (the "rotate half" / NeoX layout that Hugging Face Llama uses).

This module is the torch path. On the Triton path :class:`distgen.layers.attention.Attention` applies
the rotation itself, fused with the KV-cache store (:mod:`distgen.kernels.rotary`), from the same
``cos``/``sin`` caches."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
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


@dataclass(frozen=True)
class LongRopeSwitch:
    """Which of LongRoPE's two tables rotates a token (Phi-3).

    transformers picks one factor set per forward call: the long one when that call's largest position
    + 1 exceeds ``original``. Generating from a prompt, that makes every token of a prompt longer than
    ``original`` long, and in a shorter one's request the tokens from position ``original`` on. distgen
    applies that rule per token, from the request's prompt length and the token's position, so that a
    token's rotation never depends on batching, chunking or preemption. The cos/sin tables hold the
    short rows first and the long rows ``offset`` further: a long token reads row ``position + offset``.
    """

    original: int  # original_max_position_embeddings
    offset: int  # rows in each half of the table (max_position_embeddings)

    def rows(self, positions: np.ndarray, prompt_lens: np.ndarray) -> np.ndarray:
        """Table rows of tokens at ``positions`` in requests with ``prompt_lens`` prompt tokens."""
        long = (prompt_lens > self.original) | (positions >= self.original)
        return positions + self.offset * long


def _longrope_tables(
    shape: torch.Tensor, base: float, max_position: int, scaling: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """The short factors' rows for every position, then the long ones' (see :class:`LongRopeSwitch`):
    each frequency divided by its factor and cos/sin scaled by the attention factor, as transformers'
    ``_compute_longrope_parameters`` computes them."""
    original = int(scaling["original_max_position_embeddings"])
    factor = scaling.get("factor") or max_position / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    t = torch.arange(max_position, dtype=torch.float32)
    freqs = []
    for name in ("short_factor", "long_factor"):
        ext = torch.tensor(scaling[name], dtype=torch.float32)
        if ext.numel() != shape.numel():
            raise ValueError(f"rope scaling {name} has {ext.numel()} entries, not {shape.numel()}")
        freqs.append(torch.outer(t, 1.0 / (ext * base**shape)))
    f = torch.cat(freqs)
    return f.cos() * attention, f.sin() * attention


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[max_position, head_dim / 2]``: pair ``i`` rotates dims ``i`` and ``i + head_dim/2``.
    LongRoPE has twice the rows; ``long_rope`` says which a token reads, and the model runner passes
    those rows in place of the positions.

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
        self.long_rope: LongRopeSwitch | None = None
        if rope_type == "longrope":
            cos, sin = _longrope_tables(shape, base, max_position, scaling or {})
            original = int((scaling or {})["original_max_position_embeddings"])
            self.long_rope = LongRopeSwitch(original, max_position)
        else:
            inv_freq = 1.0 / (base**shape)
            if rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling or {})
            elif rope_type == "linear":  # positions divided by the factor (Gemma 3's global layers)
                inv_freq = inv_freq / float((scaling or {})["factor"])
            elif rope_type != "default":
                msg = f"rope scaling type {rope_type!r} is not supported (default, linear, llama3, longrope)"
                raise ValueError(msg)
            freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
            cos, sin = freqs.cos(), freqs.sin()
        if dim < head_dim:  # the dims that do not turn: cos 1, sin 0
            rest = (cos.shape[0], (head_dim - dim) // 2)
            cos, sin = torch.cat((cos, torch.ones(rest)), 1), torch.cat((sin, torch.zeros(rest)), 1)
        self.register_buffer("cos", cos.contiguous(), persistent=False)  # [rows, head_dim/2]
        self.register_buffer("sin", sin.contiguous(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate ``q`` [T, H, D] and ``k`` [T, Hkv, D] by their positions [T]."""
        rotated_q = rotate_ref(q, positions, self.cos, self.sin).to(q.dtype)
        return rotated_q, rotate_ref(k, positions, self.cos, self.sin).to(k.dtype)
