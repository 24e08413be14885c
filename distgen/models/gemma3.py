"""Gemma 3, text only (``Gemma3ForCausalLM``, model_type ``gemma3_text``, as the 1B checkpoint is):
Gemma 2's layers (models/gemma2.py) with an RMSNorm (by ``1 + w``) over each query and key head, five
sliding-window layers to each full one by default, and two rotary embeddings: the local base
(``rope_local_base_freq``, 10000) on sliding layers, the global one (``rope_theta``, 1e6, with its
``rope_scaling``) on full layers (resolved by :func:`distgen.arch_config.gemma3_rope`; transformers 5
writes both in ``rope_parameters``, one dict per layer type). No soft-capping unless the config asks
for it."""

from __future__ import annotations

from distgen.models.gemma2 import Gemma2ForCausalLM


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
    family = "gemma3"
