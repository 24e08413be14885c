"""Llama (also Mistral and SmolLM2), with switches that Qwen2 (q/k/v bias) and Qwen3 (q/k norm) reuse."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from distgen.distributed import parallel_state as ps
from distgen.layers.activation import SiluAndMul
from distgen.layers.attention import Attention, AttentionMetadata
from distgen.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from distgen.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from distgen.layers.norm import RMSNorm
from distgen.layers.rotary import RotaryEmbedding
from distgen.layers.weights import LoadedWeight
from distgen.models.weight_mapping import load_hf_weights


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict | None]:
    """(theta, scaling) from either generation of config.json: ``rope_theta`` and ``rope_scaling``
    (written by transformers 4), or one ``rope_parameters`` dict holding both (transformers 5)."""
    params = cfg.get("rope_parameters")
    if params:
        return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0), params
    return float(cfg.get("rope_theta") or 10000.0), cfg.get("rope_scaling")


# Model types whose ``sliding_window`` transformers applies to every layer (Mistral v0.1's 4096, Mixtral's,
# Phi-3's); others (Llama, Qwen2/3 without ``use_sliding_window``) carry the key but attend to everything.
_WINDOWED_MODEL_TYPES = frozenset({"mistral", "mixtral", "phi3"})


def sliding_window_of(cfg: dict[str, Any]) -> int | None:
    """The window every layer attends through, or None; ValueError for ``use_sliding_window`` (Qwen's
    per-layer windows past ``max_window_layers``, which distgen does not run)."""
    if cfg.get("use_sliding_window"):
        raise ValueError(
            f"use_sliding_window is not supported for {(cfg.get('architectures') or ['this model'])[0]}"
        )
    window = cfg.get("sliding_window")
    if window is None or cfg.get("model_type") not in _WINDOWED_MODEL_TYPES:
        return None
    if int(window) < 1:
        raise ValueError(f"sliding_window must be a positive number of keys, got {window}")
    return int(window)


def head_dim_of(cfg: dict[str, Any]) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def rotary_of(cfg: dict[str, Any]) -> RotaryEmbedding:
    """The model's one rotary embedding, shared by its layers: its cos/sin caches are
    ``max_position_embeddings x head_dim`` floats (33 MB at Llama-3.2-1B's 131072 positions)."""
    theta, scaling = rope_settings(cfg)
    return RotaryEmbedding(head_dim_of(cfg), cfg.get("max_position_embeddings", 4096), theta, scaling)


class LlamaAttention(nn.Module):
    def __init__(
        self, cfg: dict[str, Any], dtype: torch.dtype, qkv_bias: bool, qk_norm: bool, rotary: RotaryEmbedding
    ) -> None:
        super().__init__()
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        self.head_dim = head_dim_of(cfg)
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, heads, kv_heads, bias=qkv_bias, dtype=dtype)
        o_bias = bool(cfg.get("o_bias", False))
        # Split by heads, so that each rank's input features are its own heads' outputs.
        self.o_proj = RowParallelLinear(heads * self.head_dim, hidden, o_bias, dtype, unit=self.head_dim)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        eps = cfg.get("rms_norm_eps", 1e-6)
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

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(x))
        t = x.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        qk_norm = None if self.q_norm is None else (self.q_norm, self.k_norm)
        return self.o_proj(self.attn(q, k, v, meta, positions, qk_norm))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r} is not supported for this architecture (silu)")
        bias = bool(cfg.get("mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, dtype=dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: dict[str, Any],
        dtype: torch.dtype,
        qkv_bias: bool,
        qk_norm: bool,
        rotary: RotaryEmbedding,
        mlp: nn.Module | None = None,
    ) -> None:
        """``mlp``: the layer's MLP where it is not Llama's dense one (a mixture of experts)."""
        super().__init__()
        eps = cfg.get("rms_norm_eps", 1e-6)
        self.self_attn = LlamaAttention(cfg, dtype, qkv_bias, qk_norm, rotary)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg, dtype)
        self.input_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg["hidden_size"], eps, dtype)

    def forward(self, positions, x, residual, meta):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """The whole model, or under pipeline parallelism this rank's stage of it: a contiguous range of
    layers, with the embedding on the first stage and the final norm and LM head on the last."""

    qkv_bias = False
    qk_norm = False

    def __init__(self, cfg: dict[str, Any], dtype: torch.dtype) -> None:
        super().__init__()
        qkv_bias = self.qkv_bias or bool(cfg.get("attention_bias", False))
        self.tied = bool(cfg.get("tie_word_embeddings", False))
        self.first, self.last = ps.is_first_stage(), ps.is_last_stage()
        self.start_layer, count = ps.stage_layers(cfg["num_hidden_layers"])
        rotary = self.rotary_of(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(
                cfg, dtype, qkv_bias, self.qk_norm, rotary, self.mlp_of(cfg, dtype, self.start_layer + i)
            )
            for i in range(count)
        )
        if self.first:
            self.embed_tokens = VocabParallelEmbedding(cfg["vocab_size"], cfg["hidden_size"], dtype)
        if self.last:
            self.norm = RMSNorm(cfg["hidden_size"], cfg.get("rms_norm_eps", 1e-6), dtype)
            self.lm_head = ParallelLMHead(cfg["vocab_size"], cfg["hidden_size"], dtype=dtype)
            if self.tied and self.first:
                self.lm_head.tie(self.embed_tokens)
        window = sliding_window_of(cfg)
        for attn in self.attention_layers() if window is not None else ():
            attn.sliding_window = window

    @staticmethod
    def rotary_of(cfg: dict[str, Any]) -> RotaryEmbedding:
        """The rotary embedding the layers share (a subclass with its own rope variant overrides it)."""
        return rotary_of(cfg)

    def mlp_of(self, cfg: dict[str, Any], dtype: torch.dtype, layer: int) -> nn.Module:
        """The MLP of layer ``layer`` (numbered over the whole model); a mixture-of-experts subclass
        overrides it."""
        return LlamaMLP(cfg, dtype)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers]

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final hidden states; on a stage before the last, (hidden, residual) for the next
        stage, which passes them back in as ``intermediate``."""
        if intermediate is None:
            x, residual = self.embed(input_ids), None
        else:
            x, residual = intermediate
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
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
