"""Llama (also Mistral and SmolLM2), with switches that Qwen2 (q/k/v bias) and Qwen3 (q/k norm) reuse."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from distgen.arch_config import ArchConfig, arch_of
from distgen.distributed import parallel_state as ps
from distgen.layers.activation import SiluAndMul
from distgen.layers.attention import Attention, AttentionMetadata
from distgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distgen.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distgen.layers.norm import RMSNorm
from distgen.layers.rotary import RotaryEmbedding
from distgen.layers.weights import LoadedWeight
from distgen.models.weight_mapping import load_hf_weights


def rotary_of(arch: ArchConfig) -> RotaryEmbedding:
    """The model's one rotary embedding, shared by its layers: its cos/sin caches are
    ``max_position_embeddings x head_dim`` floats (33 MB at Llama-3.2-1B's 131072 positions)."""
    return RotaryEmbedding(arch.head_dim, arch.rotary_positions, arch.rope_theta, arch.rope_scaling)


class LlamaAttention(nn.Module):
    def __init__(
        self, arch: ArchConfig, dtype: torch.dtype, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding
    ) -> None:
        super().__init__()
        hidden, heads = arch.hidden_size, arch.num_heads
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            hidden, self.head_dim, heads, arch.num_kv_heads, bias=qkv_bias, dtype=dtype
        )
        # Split by heads, so that each rank's input features are its own heads' outputs.
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, arch.o_bias, dtype, unit=self.head_dim)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        eps = arch.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps, dtype) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps, dtype) if qk_norm else None
        shard = self.qkv_proj.shard
        self.attn = Attention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.head_dim**-0.5,
            rotary,
            group=shard.group,
            head_offset=shard.head_offset,
        )

    def forward(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        meta: AttentionMetadata,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``keep``: the rows whose output is wanted (all of them write K/V; see LlamaForCausalLM)."""
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        t = x.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        qk_norm = None if self.q_norm is None else (self.q_norm, self.k_norm)
        out = self.attn(q, k, v, meta, positions, qk_norm)
        return self.o_proj(out if keep is None else out[keep])


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inter = arch.hidden_size, arch.require("intermediate_size")
        if arch.hidden_act != "silu":
            raise ValueError(f"hidden_act {arch.hidden_act!r} is not supported for this architecture (silu)")
        bias = arch.mlp_bias
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, dtype=dtype)
        self.act = SiluAndMul()
        self.gate_up_proj.feeds_silu_and_mul = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj.silu_and_mul(x)  # the CPU GEMM's fused epilogue, where it applies
        return self.down_proj(h if h is not None else self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        arch: ArchConfig,
        dtype: torch.dtype,
        qkv_bias: bool,
        qk_norm: bool,
        rotary: RotaryEmbedding,
        mlp: nn.Module | None = None,
    ) -> None:
        """``mlp``: the layer's MLP where it is not Llama's dense one (a mixture of experts)."""
        super().__init__()
        eps = arch.rms_norm_eps
        self.self_attn = LlamaAttention(arch, dtype, qkv_bias, qk_norm, rotary)
        self.mlp = mlp if mlp is not None else LlamaMLP(arch, dtype)
        self.input_layernorm = RMSNorm(arch.hidden_size, eps, dtype)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps, dtype)

    def forward(self, positions, x, residual, meta, keep=None):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta, keep)
        if keep is not None:
            residual = residual[keep]
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """The whole model, or under pipeline parallelism this rank's stage of it: a contiguous range of
    layers, with the embedding on the first stage and the final norm and LM head on the last."""

    qkv_bias = False
    qk_norm = False
    family = "llama"  # whose defaults a config.json dict handed to the constructor takes
    keeps_rows = True  # forward takes ``keep`` (the model runner asks)

    def __init__(self, cfg: ArchConfig | Mapping[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        arch = arch_of(cfg, self.family)
        qkv_bias = self.qkv_bias or arch.attention_bias
        self.tied = arch.tie_word_embeddings
        self.first, self.last = ps.is_first_stage(), ps.is_last_stage()
        self.start_layer, count = ps.stage_layers(arch.num_layers)
        rotary = self.rotary_of(arch)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                arch, dtype, qkv_bias, self.qk_norm, rotary, self.mlp_of(arch, dtype, self.start_layer + i)
            )
            for i in range(count)
        )
        if self.first:
            self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype)
        if self.last:
            self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype)
            self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, dtype=dtype)
            if self.tied and self.first:
                self.lm_head.tie(self.embed_tokens)
        window = arch.sliding_window
        for attn in self.attention_layers() if window is not None else ():
            attn.sliding_window = window

    @classmethod
    def rotary_of(cls, cfg: ArchConfig | Mapping[str, Any]) -> RotaryEmbedding:
        """The rotary embedding the layers share (a subclass with its own rope variant overrides it)."""
        return rotary_of(arch_of(cfg, cls.family))

    def mlp_of(self, arch: ArchConfig, dtype: torch.dtype, layer: int) -> nn.Module:
        """The MLP of layer ``layer`` (numbered over the whole model); a mixture-of-experts subclass
        overrides it."""
        return LlamaMLP(arch, dtype)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states; on a stage before the last, (hidden, residual) for the next
        stage, which passes them back in as ``intermediate``.

        ``keep``: on the last stage, the only rows whose hidden states are wanted (the rows that
        sample), in the order wanted. The last layer still writes every row's K/V, then carries only
        those rows through its output projection and MLP: a prefill chunk's other rows would only be
        thrown away. Each kept row's result is the one the whole batch gives it, as each row of a
        GEMM is its own sum."""
        if intermediate is None:
            x, residual = self.embed(input_ids), None
        else:
            x, residual = intermediate
        final = len(self.layers) - 1 if self.last and keep is not None else -1
        for i, layer in enumerate(self.layers):
            x, residual = layer(positions, x, residual, meta, keep if i == final else None)
        if not self.last:
            return x, residual
        x, _ = self.norm(x, residual)
        return x

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The first stage's input embeddings (a family that scales them overrides this)."""
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)

    # -- weights ------------------------------------------------------------------------------
    _stacked = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        """Load Hugging Face-named weights; returns the names of the parameters that were filled."""
        # A checkpoint's lm_head.weight is skipped where the head shares the embedding's parameter.
        shared = self.tied and self.first
        return load_hf_weights(self, self._of_this_stage(weights), ("model.",), self._stacked, shared)

    _LAYER = re.compile(r"((?:model\.)?layers\.)(\d+)(\..*)")

    def _of_this_stage(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterator[tuple[str, LoadedWeight]]:
        """The checkpoint weights this stage holds, layers renumbered from its first; a tied LM head
        on a last stage without the embedding takes the embedding's weight as its own."""
        for name, w in weights:
            m = self._LAYER.fullmatch(name)
            if m:
                i = int(m[2]) - self.start_layer
                if 0 <= i < len(self.layers):
                    yield f"{m[1]}{i}{m[3]}", w
            elif "embed_tokens." in name:
                if self.first:
                    yield name, w
                elif self.last and self.tied:
                    yield "lm_head.weight", w
            elif name.startswith(("model.norm.", "norm.", "lm_head.")):
                if self.last and not (name.startswith("lm_head.") and self.tied and not self.first):
                    yield name, w
            else:
                yield name, w
