"""Phi-3 (Phi-3-mini, Phi-3.5-mini, Phi-4-mini): the Llama layout with fused checkpoint weights,
LongRoPE and an optional partial rotary.

- The checkpoint stacks q, k and v in one ``qkv_proj.weight`` and gate and up in one
  ``gate_up_proj.weight``. Each is cut into its parts (lazily: a rank reads only its own rows) and
  handed to the loaders Llama's q/k/v and gate/up weights go through, so every TP rank takes its
  heads and its slice of the MLP as it would from separate tensors.
- LongRoPE: :class:`~distgen.layers.rotary.RotaryEmbedding` holds the short and the long tables;
  :class:`~distgen.layers.rotary.LongRopeSwitch` says which one a token reads, as transformers decides
  it while generating (the model runner applies it; the scheduler caches long prompts' blocks apart).
- A sliding window (``sliding_window``) applies to every layer, as transformers' mask does.
- A partial rotary (``partial_rotary_factor``, 0.75 in Phi-4-mini) turns the first ``rotary_dim`` dims
  of each head (pairs ``i, i + rotary_dim/2``), while distgen's rotary and its kernels pair ``i`` with
  ``i + head_dim/2``. The q and k rows of each head are permuted at load so that the turning pairs
  land there and the rest sit on pairs with cos 1 and sin 0. Queries and keys are permuted alike, so
  their dot products (the attention scores) are unchanged; values are not touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from distgen.arch_config import ArchConfig, arch_of
from distgen.kernels.quant import QuantizedWeight
from distgen.layers.rotary import RotaryEmbedding
from distgen.layers.weights import LoadedWeight, row_part, shape_of
from distgen.models.llama import LlamaForCausalLM


def partial_rotary_perm(head_dim: int, rotary_dim: int) -> torch.Tensor:
    """For each row of distgen's head layout, the checkpoint row it takes: the turning dims' two halves
    go to the front of each half of the head, the others after them."""
    h, p = rotary_dim // 2, (head_dim - rotary_dim) // 2
    idx = torch.arange(head_dim)
    turn_a, turn_b = idx[:h], idx[h:rotary_dim]
    rest_a, rest_b = idx[rotary_dim : rotary_dim + p], idx[rotary_dim + p :]
    return torch.cat((turn_a, rest_a, turn_b, rest_b))


class _HeadRows:
    """Rows of a lazy checkpoint slice made of whole heads, each head's rows permuted by ``perm``."""

    def __init__(self, w: Any, perm: torch.Tensor) -> None:
        self.w, self.perm, self.d = w, perm, perm.numel()

    def get_shape(self) -> list[int]:
        return list(self.w.get_shape())

    def __getitem__(self, index: slice | tuple[slice, ...]) -> torch.Tensor:
        index = index if isinstance(index, tuple) else (index,)
        first, *rest = index or (slice(None),)
        lo, hi, _ = first.indices(self.get_shape()[0])
        if lo % self.d or hi % self.d:
            raise ValueError(f"rows {lo}..{hi} are not whole heads of {self.d}")
        return permute_heads(self.w[(slice(lo, hi), *rest)], self.perm)


def permute_heads(w: LoadedWeight, perm: torch.Tensor) -> LoadedWeight:
    if isinstance(w, QuantizedWeight):  # a GGUF file's rows move whole, blocks and scales with them
        order = permute_heads(torch.arange(w.out_features), perm)
        parts = [t[order].contiguous() for t in w.tensors()]
        mins = parts[2] if w.mins is not None else None
        return QuantizedWeight(w.fmt, parts[0], parts[1], mins, w.out_features, w.in_features)
    if not isinstance(w, torch.Tensor):
        return _HeadRows(w, perm)
    return w.unflatten(0, (-1, perm.numel()))[:, perm].flatten(0, 1)


class Phi3ForCausalLM(LlamaForCausalLM):
    family = "phi3"

    def __init__(self, cfg: ArchConfig | Mapping[str, Any], dtype: torch.dtype) -> None:
        arch = arch_of(cfg, self.family)
        if arch.attention_bias or arch.mlp_bias:
            raise ValueError("Phi-3 checkpoints have no attention or MLP bias; this config asks for one")
        super().__init__(arch, dtype)
        self.head_dim = arch.head_dim
        self.q_size = arch.num_heads * self.head_dim
        self.kv_size = arch.num_kv_heads * self.head_dim
        self.intermediate = arch.require("intermediate_size")
        rotary_dim = arch.rotary_dim
        self.perm = None if rotary_dim == self.head_dim else partial_rotary_perm(self.head_dim, rotary_dim)

    @classmethod
    def rotary_of(cls, cfg: ArchConfig | Mapping[str, Any]) -> RotaryEmbedding:
        arch = arch_of(cfg, cls.family)
        return RotaryEmbedding(
            arch.head_dim, arch.rotary_positions, arch.rope_theta, arch.rope_scaling, arch.rotary_dim
        )

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        return super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, LoadedWeight]]) -> Iterator[tuple[str, LoadedWeight]]:
        """The fused weights as their parts under Llama's names (``q_proj``, ``k_proj``, ``v_proj``,
        ``gate_proj``, ``up_proj``), q and k permuted for a partial rotary; others as they are."""
        for name, w in weights:
            if name.endswith(".qkv_proj.weight"):
                parts = {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}
                stem = name[: -len("qkv_proj.weight")]
            elif name.endswith(".gate_up_proj.weight"):
                parts = {"gate": self.intermediate, "up": self.intermediate}
                stem = name[: -len("gate_up_proj.weight")]
            else:
                yield name, w
                continue
            rows = shape_of(w)[0]
            if rows != sum(parts.values()):
                raise ValueError(f"checkpoint weight {name!r} has {rows} rows, not {sum(parts.values())}")
            start = 0
            for part, size in parts.items():
                piece = row_part(w, start, size)
                if self.perm is not None and part in ("q", "k"):
                    piece = permute_heads(piece, self.perm)
                yield f"{stem}{part}_proj.weight", piece
                start += size
