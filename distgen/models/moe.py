"""Mixture-of-experts families on Llama's layout: Mixtral, Qwen2-MoE and Qwen3-MoE.

Attention, norms, pipeline stages and the dense weights are Llama's (:class:`LlamaForCausalLM`); a
layer's MLP is a :class:`~distgen.layers.fused_moe.SparseMoeBlock` (a replicated router and experts
sharded across the TP ranks, each rank a slice of every expert) or, in the Qwen families' dense
layers, Llama's MLP.

Checkpoints name each expert's weights apart (Mixtral ``block_sparse_moe.experts.N.w1/w2/w3``, the
Qwen families ``mlp.experts.N.gate_proj/up_proj/down_proj``); each goes into its expert's row of the
stacked per-rank tensors. The fused layout of transformers' in-memory modules (``experts.gate_up_proj``
[E, 2 * I, H], ``experts.down_proj`` [E, H, I]) loads as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from distgen.arch_config import ArchConfig, arch_of
from distgen.layers.fused_moe import SparseMoeBlock
from distgen.layers.weights import LoadedWeight
from distgen.models.llama import LlamaForCausalLM, LlamaMLP

_EXPERT = re.compile(
    r"(?:model\.)?layers\.(\d+)\.mlp\.experts\."
    r"(?:(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight|(gate_up_proj|down_proj)(?:\.weight)?)"
)
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
_FUSED_PART = {"gate_up_proj": "gate_up", "down_proj": "down"}


class MoeForCausalLM(LlamaForCausalLM):
    """Llama with a mixture-of-experts MLP where :meth:`mlp_of` builds one."""

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> set[str]:
        loaded = super().load_weights(weights)
        for i, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                loaded |= {f"layers.{i}.mlp.experts.{n}" for n in layer.mlp.experts.loaded_params()}
        return loaded

    def _of_this_stage(
        self, weights: Iterable[tuple[str, LoadedWeight]]
    ) -> Iterator[tuple[str, LoadedWeight]]:
        """Llama's stage filter, with each expert weight loaded into its layer's experts on the way
        (the rest go on to the shared loop); Mixtral's ``block_sparse_moe`` is read as ``mlp``."""
        renamed = ((name.replace(".block_sparse_moe.", ".mlp."), w) for name, w in weights)
        for name, w in super()._of_this_stage(renamed):
            m = _EXPERT.fullmatch(name)
            if m is None:
                yield name, w
                continue
            mlp = self.layers[int(m[1])].mlp
            if not isinstance(mlp, SparseMoeBlock):
                raise ValueError(f"checkpoint weight {name!r} is an expert of a dense layer")
            experts = mlp.experts
            if m[2] is not None:
                part, expert = _PART[m[3]], int(m[2])
            else:
                part, expert = _FUSED_PART[m[4]], None
            param = experts.w2_weight if part == "down" else experts.w13_weight
            experts.weight_loader(param, w, (part, expert))


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer a mixture of ``num_local_experts``, the top-k weights renormalised."""

    def mlp_of(self, arch: ArchConfig, dtype: torch.dtype, layer: int) -> nn.Module:
        if not arch.num_experts:
            raise ValueError("the model's config lacks num_local_experts, which MixtralForCausalLM needs")
        return SparseMoeBlock(
            arch.hidden_size,
            arch.num_experts,
            arch.require("num_experts_per_tok"),
            arch.require("intermediate_size"),
            renormalize=True,
            dtype=dtype,
            hidden_act=arch.hidden_act,
        )


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE: Qwen3's attention (q/k norm); experts of ``moe_intermediate_size`` in every
    ``decoder_sparse_step``-th layer not listed in ``mlp_only_layers`` (the others dense), the top-k
    weights renormalised where ``norm_topk_prob``."""

    qk_norm = True

    @staticmethod
    def shared_intermediate(arch: ArchConfig) -> int:
        return 0

    def mlp_of(self, arch: ArchConfig, dtype: torch.dtype, layer: int) -> nn.Module:
        num_experts = arch.num_experts
        if layer in arch.mlp_only_layers or num_experts == 0 or (layer + 1) % arch.decoder_sparse_step:
            return LlamaMLP(arch, dtype)
        return SparseMoeBlock(
            arch.hidden_size,
            num_experts,
            arch.require("num_experts_per_tok"),
            arch.require("moe_intermediate_size"),
            renormalize=arch.norm_topk_prob,
            dtype=dtype,
            shared_intermediate=self.shared_intermediate(arch),
            hidden_act=arch.hidden_act,
        )


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen2-MoE: Qwen2's attention (q/k/v bias) and Qwen3-MoE's layer rule, plus a shared expert in
    each sparse layer that every token runs, scaled by ``sigmoid(shared_expert_gate(x))``."""

    qk_norm = False
    qkv_bias = True

    def __init__(self, cfg: ArchConfig | Mapping[str, Any], dtype: torch.dtype) -> None:
        arch = arch_of(cfg, self.family)
        if not arch.qkv_bias:
            raise ValueError(
                "qkv_bias false is not supported for Qwen2MoeForCausalLM (its q/k/v have biases)"
            )
        super().__init__(arch, dtype)

    @staticmethod
    def shared_intermediate(arch: ArchConfig) -> int:
        return int(arch.require("shared_expert_intermediate_size"))
