"""Rotary settings are read from both generations of config.json: ``rope_theta``/``rope_scaling``
(transformers 4) and ``rope_parameters`` (transformers 5 writes this one), and give the cos/sin tables
transformers computes for the same config (default and Llama-3 scaling)."""

from __future__ import annotations

import pytest
import torch

from distgen.arch_config import rope_settings
from distgen.layers.rotary import RotaryEmbedding

LLAMA3 = dict(
    rope_type="llama3",
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)


@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope_tables_match_transformers_for_both_config_styles(scaling):
    import transformers as tf

    kwargs = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    cfg = tf.LlamaConfig(**kwargs, rope_theta=500000.0, rope_scaling=scaling)
    new_style = cfg.to_dict()
    assert "rope_parameters" in new_style or "rope_theta" in new_style
    old_style = {**kwargs, "rope_theta": 500000.0, "rope_scaling": scaling}
    positions = torch.arange(0, 512, 7)
    x = torch.zeros(1, len(positions), 32)
    hf_cos, hf_sin = tf.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)(x, positions[None])
    for style in (new_style, old_style):
        theta, rope_scaling = rope_settings(style)
        assert theta == 500000.0
        rot = RotaryEmbedding(32, 512, theta, rope_scaling)
        torch.testing.assert_close(rot.cos[positions], hf_cos[0, :, :16], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rot.sin[positions], hf_sin[0, :, :16], atol=1e-5, rtol=1e-5)


def test_one_rotary_table_per_model_not_per_layer():
    """Llama-3.2-1B's table is 131072 positions x 64 floats x 2 (33 MB): once per model, not 16 times."""
    from distgen.models.llama import LlamaForCausalLM

    cfg = dict(
        hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
        intermediate_size=32, vocab_size=32, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, torch.float32)
    assert [name.rsplit(".", 1)[1] for name, _ in model.named_buffers()] == ["cos", "sin"]
    rotaries = {id(layer.self_attn.attn.rotary) for layer in model.layers}
    assert len(rotaries) == 1
