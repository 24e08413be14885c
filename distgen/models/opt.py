"""OPT: learned absolute positions (offset by 2), LayerNorm, ReLU, biases everywhere."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distgen.arch_config import ArchConfig, arch_of
from distgen.layers.attention import Attention, AttentionMetadata
from distgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distgen.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from distgen.layers.weights import LoadedWeight
from distgen.models.weight_mapping import load_hf_weights

_POS_OFFSET = 2  # OPT's position table starts two rows in


class OPTAttention(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, heads = arch.hidden_size, arch.num_heads
        self.head_dim = hidden // heads
        bias = arch.enable_bias
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, heads, bias=bias, dtype=dtype)
        self.out_proj = RowParallelLinear(hidden, hidden, bias=bias, dtype=dtype, unit=self.head_dim)
        self.num_heads = self.qkv_proj.num_heads
        self.attn = Attention(self.num_heads, self.num_heads, self.head_dim, self.head_dim**-0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        shape = (t, self.num_heads, self.head_dim)
        return self.out_proj(self.attn(q.view(shape), k.view(shape), v.view(shape), meta))


class OPTDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, ffn = arch.hidden_size, arch.require("ffn_dim")
        bias = arch.enable_bias
        act = arch.activation_function
        if act != "relu":
            raise ValueError(f"OPT activation_function {act!r} is not supported (relu)")
        self.pre_ln = arch.do_layer_norm_before
        affine = arch.layer_norm_elementwise_affine
        self.self_attn = OPTAttention(arch, dtype)
        self.self_attn_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine, dtype=dtype)
        self.fc1 = ColumnParallelLinear(hidden, ffn, bias=bias, dtype=dtype)
        self.fc2 = RowParallelLinear(ffn, hidden, bias=bias, dtype=dtype)
        self.final_layer_norm = nn.LayerNorm(hidden, elementwise_affine=affine, dtype=dtype)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        residual = x
        if self.pre_ln:
            x = self.self_attn_layer_norm(x)
        x = residual + self.self_attn(x, meta)
        if not self.pre_ln:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_ln:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(F.relu(self.fc1(x)))
        if not self.pre_ln:
            x = self.final_layer_norm(x)
        return x


class OPTForCausalLM(nn.Module):
    family = "opt"  # whose defaults a config.json dict handed to the constructor takes

    def __init__(self, cfg: ArchConfig | Mapping[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        arch = arch_of(cfg, self.family)
        hidden = arch.hidden_size
        proj = arch.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, proj, dtype)
        positions = arch.require("max_position_embeddings") + _POS_OFFSET
        self.embed_positions = nn.Embedding(positions, hidden, dtype=dtype)
        self.project_in = ReplicatedLinear(proj, hidden, bias=False, dtype=dtype) if proj != hidden else None
        self.project_out = ReplicatedLinear(hidden, proj, bias=False, dtype=dtype) if proj != hidden else None
        self.layers = nn.ModuleList(OPTDecoderLayer(arch, dtype) for _ in range(arch.num_layers))
        final_ln = arch.do_layer_norm_before and not arch.remove_final_layer_norm
        self.final_layer_norm = nn.LayerNorm(hidden, dtype=dtype) if final_ln else None
        self.lm_head = ParallelLMHead(arch.vocab_size, proj, dtype=dtype)
        self.tied = arch.tie_word_embeddings
        if self.tied:
            self.lm_head.tie(self.embed_tokens)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + _POS_OFFSET)
        for layer in self.layers:
            x = layer(x, meta)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    _stacked = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        """Load Hugging Face-named weights; returns the names of the parameters that were filled."""
        return load_hf_weights(self, weights, ("model.decoder.", "decoder."), self._stacked, self.tied)
