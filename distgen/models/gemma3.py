"""Gemma 3, text only (``Gemma3ForCausalLM``, model_type ``gemma3_text``, as the 1B checkpoint is):
Gemma 2's layers (models/gemma2.py) with an RMSNorm (by ``1 + w``) over each query and key head, five
sliding-window layers to each full one by default, and two rotary embeddings: the local base
(``rope_local_base_freq``, 10000) on sliding layers, the global one (``rope_theta``, 1e6, with its
``rope_scaling``) on full layers. transformers 5 writes both in ``rope_parameters``, one dict per layer
type. No soft-capping unless the config asks for it."""

from __future__ import annotations

from typing import Any

from distgen.layers.rotary import RotaryEmbedding
from distgen.models.gemma2 import SLIDING, Gemma2ForCausalLM
from distgen.models.llama import head_dim_of


def gemma3_rope(cfg: dict[str, Any], layer_type: str) -> tuple[float, dict | None]:
    """(theta, scaling) of a layer type, from either generation of config.json."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get(layer_type), dict):
        p = params[layer_type]
        return float(p.get("rope_theta") or (10000.0 if layer_type == SLIDING else 1e6)), p
    if layer_type == SLIDING:
        return float(cfg.get("rope_local_base_freq") or 10000.0), None
    return float(cfg.get("rope_theta") or 1e6), cfg.get("rope_scaling")


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    default_pattern = 6

    @staticmethod
    def rotary_for(cfg: dict[str, Any], layer_type: str) -> RotaryEmbedding:
        theta, scaling = gemma3_rope(cfg, layer_type)
        return RotaryEmbedding(head_dim_of(cfg), cfg.get("max_position_embeddings", 32768), theta, scaling)
