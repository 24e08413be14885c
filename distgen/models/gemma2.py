"""Gemma 2, and the pieces Gemma 3 (models/gemma3.py) shares with it.

What sets them apart from Llama, as transformers computes it:

- the embedding is scaled by ``sqrt(hidden_size)`` (the factor rounded to the model's dtype);
- every RMSNorm multiplies by ``1 + weight`` (the checkpoint stores the offset from 1), normalising
  and scaling in float32 and rounding once (:class:`GemmaRMSNorm`);
- four norms per layer: before and after attention, before and after the MLP, whose output is added
  to the residual stream after its post-norm;
- a GeLU-tanh MLP, attention scaled by ``query_pre_attn_scalar ** -0.5``, ``head_dim`` from the config,
  an LM head tied to the embedding;
- sliding-window layers (``layer_types``, or every other layer from the first in older configs) and,
  in Gemma 2, soft-capped attention scores and final logits (``softcap * tanh(x / softcap)``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from distgen.arch_config import SLIDING, ArchConfig, arch_of
from distgen.distributed import parallel_state as ps
from distgen.layers.activation import GeluTanhAndMul
from distgen.layers.attention import Attention, AttentionMetadata
from distgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distgen.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from distgen.layers.norm import RMSNorm
from distgen.layers.rotary import RotaryEmbedding
from distgen.layers.weights import LoadedWeight, materialize
from distgen.models.llama import LlamaAttention, LlamaForCausalLM


class GemmaRMSNorm(RMSNorm):
    """RMSNorm by ``1 + w`` for a checkpoint weight ``w``. ``weight`` holds ``1 + w`` in the model's
    dtype, so that float32 models take the fused kernels and the fused q/k norms unchanged (the same
    float32 products transformers computes); in a 16-bit dtype the norm runs in torch with ``1 + w``
    kept in float32 (``weight32``), rounding once at the end as transformers does."""

    def __init__(self, hidden: int, eps: float = 1e-6, dtype: torch.dtype | None = None) -> None:
        super().__init__(hidden, eps, dtype)
        self.weight.weight_loader = self.load_offset
        self.register_buffer("weight32", torch.ones(hidden, dtype=torch.float32), persistent=False)

    def load_offset(self, param: nn.Parameter, w: LoadedWeight, shard_id: object = None) -> None:
        """Takes the checkpoint's ``w`` (the offset from 1)."""
        t = materialize(w)
        if tuple(t.shape) != tuple(param.shape):
            raise ValueError(f"norm weight of shape {tuple(t.shape)} does not fit {tuple(param.shape)}")
        with torch.no_grad():
            self.weight32.copy_(t.float() + 1.0)
            param.copy_(self.weight32)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float32:
            return super().forward(x, residual)
        if residual is not None:
            x = x + residual
            residual = x
        x32 = x.float()
        out = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight32).to(x.dtype)
        return out if residual is None else (out, residual)


def check_gemma_config(arch: ArchConfig) -> None:
    if arch.use_bidirectional_attention:
        raise ValueError("use_bidirectional_attention (an embedding model's attention) is not supported")
    if arch.attention_bias:
        raise ValueError("Gemma checkpoints have no attention bias; this config asks for one")
    act = arch.hidden_act
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"hidden_activation {act!r} is not supported for Gemma (gelu_pytorch_tanh)")


class GemmaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inter = arch.hidden_size, arch.require("intermediate_size")
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=False, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, hidden, bias=False, dtype=dtype)
        self.act = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class GemmaAttention(LlamaAttention):
    """Llama's projections; Gemma's scale, window, soft-cap and (Gemma 3) q/k norms."""

    def __init__(
        self,
        arch: ArchConfig,
        dtype: torch.dtype,
        rotary: RotaryEmbedding,
        qk_norm: bool,
        window: int | None,
    ) -> None:
        super().__init__(arch, dtype, False, False, rotary)
        eps = arch.rms_norm_eps
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, eps, dtype)
            self.k_norm = GemmaRMSNorm(self.head_dim, eps, dtype)
        shard = self.qkv_proj.shard
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            float(arch.query_pre_attn_scalar or self.head_dim) ** -0.5,
            rotary,
            group=shard.group,
            head_offset=shard.head_offset,
            sliding_window=window,
            softcap=arch.attn_logit_softcapping,
        )


class GemmaDecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        dtype: torch.dtype,
        rotary: RotaryEmbedding,
        qk_norm: bool,
        window: int | None,
    ) -> None:
        super().__init__()
        eps, hidden = arch.rms_norm_eps, arch.hidden_size
        self.self_attn = GemmaAttention(arch, dtype, rotary, qk_norm, window)
        self.mlp = GemmaMLP(arch, dtype)
        self.input_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps, dtype)

    def forward(self, positions, x, residual, meta: AttentionMetadata, keep=None):
        """(x, residual) in and out, their sum the hidden state, as in Llama's layers; ``keep`` as
        there."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta, keep))
        if keep is not None:
            residual = residual[keep]
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Llama's stage split, weight loading and forward loop over Gemma's layers."""

    qk_norm = False
    family = "gemma2"

    def __init__(self, cfg: ArchConfig | Mapping[str, Any], dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        arch = arch_of(cfg, self.family)
        check_gemma_config(arch)
        hidden = arch.hidden_size
        self.tied = arch.tie_word_embeddings
        self.first, self.last = ps.is_first_stage(), ps.is_last_stage()
        self.start_layer, count = ps.stage_layers(arch.num_layers)
        types = arch.require("layer_types")[self.start_layer : self.start_layer + count]
        window = arch.sliding_window
        rotaries = {t: self.rotary_for(arch, t) for t in set(types)}
        self.layers = nn.ModuleList(
            GemmaDecoderLayer(arch, dtype, rotaries[t], self.qk_norm, window if t == SLIDING else None)
            for t in types
        )
        # sqrt(hidden) as transformers holds it: a float32 tensor, cast to the model's dtype.
        self.register_buffer("embed_scale", torch.tensor(hidden**0.5).to(dtype), persistent=False)
        self.final_softcap = arch.final_logit_softcapping
        if self.first:
            self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, hidden, dtype)
        if self.last:
            self.norm = GemmaRMSNorm(hidden, arch.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(arch.vocab_size, hidden, dtype=dtype)
            if self.tied and self.first:
                self.lm_head.tie(self.embed_tokens)

    @classmethod
    def rotary_for(cls, cfg: ArchConfig | Mapping[str, Any], layer_type: str) -> RotaryEmbedding:
        """The rotary embedding of a layer type's layers (one serves both in Gemma 2)."""
        arch = arch_of(cfg, cls.family)
        theta, scaling = arch.rope_of(layer_type)
        return RotaryEmbedding(arch.head_dim, arch.rotary_positions, theta, scaling)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden)
        if logits is None or self.final_softcap is None:
            return logits
        cap = self.final_softcap
        return torch.tanh(logits / cap) * cap
