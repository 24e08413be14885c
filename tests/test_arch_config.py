"""The typed architecture config: config.json dicts of each family resolved once into the fields the
models read, with today's defaults per family, and bad values refused with a ValueError naming the
field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distgen.arch_config import FULL, SLIDING, ArchConfig
from distgen.config import ModelConfig
from distgen.model_loader.gguf import default_model_path
from distgen.model_loader.loader import resolve_model
from tests.conftest import PHI3_ORIGINAL_MAX, _tiny_config

# The least a config.json may hold: every other field takes its family's default.
BARE = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)


def _dict(hf_cfg, arch: str) -> dict:
    return {**hf_cfg.to_dict(), "architectures": [arch]}


def test_smollm2_gguf_resolves_through_the_loader():
    source = resolve_model(str(default_model_path()))
    arch = source.arch
    assert (arch.architecture, arch.family, arch.model_type) == ("LlamaForCausalLM", "llama", "llama")
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads) == (576, 30, 9, 3)
    assert (arch.head_dim, arch.vocab_size, arch.intermediate_size) == (64, 49152, 1536)
    assert arch.rms_norm_eps == pytest.approx(1e-5) and arch.hidden_act == "silu"
    assert arch.tie_word_embeddings is True and arch.rope_theta == 100000.0 and arch.rope_scaling is None
    assert arch.max_position_embeddings == arch.rotary_positions == 8192 and arch.rotary_dim == 64
    assert arch.sliding_window is None and arch.layer_types is None and arch.num_experts == 0
    assert arch.active_mlp_width == 1536 and arch.long_rope_original is None
    model = ModelConfig(source=source, dtype=torch.float32, max_model_len=64)
    assert model.arch is source.arch  # resolved once, shared
    assert (model.num_layers, model.num_heads, model.num_kv_heads, model.head_dim) == (30, 9, 3, 64)
    assert model.vocab_size == 49152 and model.architecture == "LlamaForCausalLM"
    # A changed config (hf_overrides) comes as a new source, resolved anew.
    changed = dataclasses.replace(source, hf_config={**source.hf_config, "rms_norm_eps": 1e-3})
    assert changed.arch.rms_norm_eps == 1e-3 and source.arch.rms_norm_eps == pytest.approx(1e-5)


def test_llama_defaults_and_frozen():
    arch = ArchConfig.from_hf(BARE)
    assert arch.family == "llama" and arch.architecture == "?"
    assert (arch.num_kv_heads, arch.head_dim, arch.intermediate_size) == (4, 16, None)
    assert (arch.rms_norm_eps, arch.hidden_act, arch.tie_word_embeddings) == (1e-6, "silu", False)
    assert (arch.max_position_embeddings, arch.rotary_positions) == (None, 4096)
    assert (arch.rope_theta, arch.rope_scaling, arch.rotary_dim) == (10000.0, None, 16)
    assert not (arch.attention_bias or arch.mlp_bias or arch.o_bias) and arch.qkv_bias
    assert arch.active_mlp_width == 4 * 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.hidden_size = 8  # type: ignore[misc]


def test_sliding_window_applies_to_every_layer_only_where_transformers_applies_it():
    assert (
        ArchConfig.from_hf({**BARE, "model_type": "mistral", "sliding_window": 4096}).sliding_window == 4096
    )
    assert ArchConfig.from_hf({**BARE, "model_type": "llama", "sliding_window": 4096}).sliding_window is None
    with pytest.raises(ValueError, match="sliding_window"):
        ArchConfig.from_hf({**BARE, "model_type": "mixtral", "sliding_window": 0})
    with pytest.raises(ValueError, match="use_sliding_window is not supported for Qwen2ForCausalLM"):
        ArchConfig.from_hf({**BARE, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True})


def test_gemma_families():
    import transformers as tf

    g2 = ArchConfig.from_hf(
        _dict(
            tf.Gemma2Config(
                **BARE, intermediate_size=96, head_dim=32, sliding_window=16, query_pre_attn_scalar=24,
                attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
            ),
            "Gemma2ForCausalLM",
        )
    )  # fmt: skip
    assert g2.family == "gemma2" and g2.head_dim == 32 and g2.hidden_act == "gelu_pytorch_tanh"
    assert g2.layer_types == (SLIDING, FULL) and g2.sliding_window == 16 and g2.tie_word_embeddings
    assert (g2.query_pre_attn_scalar, g2.attn_logit_softcapping, g2.final_logit_softcapping) == (24, 1, 2)
    # Bare configs: Gemma 2 alternates, Gemma 3 has five sliding layers to a full one.
    bare2 = ArchConfig.from_hf({**BARE, "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 4})
    assert bare2.layer_types == (SLIDING, FULL, SLIDING, FULL) and bare2.rotary_positions == 8192
    bare3 = ArchConfig.from_hf({**BARE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 7})
    assert bare3.layer_types == (SLIDING,) * 5 + (FULL, SLIDING) and bare3.rotary_positions == 32768
    assert bare3.rope_of(FULL) == (1e6, None) and bare3.rope_of(SLIDING) == (10000.0, None)
    patterned = {**BARE, "num_hidden_layers": 3, "sliding_window_pattern": 3}
    assert ArchConfig.from_hf(patterned, "gemma3").layer_types == (SLIDING, SLIDING, FULL)
    with pytest.raises(ValueError, match="layer_types"):
        ArchConfig.from_hf({**patterned, "layer_types": [SLIDING, FULL]}, "gemma2")
    # transformers 5's per-layer-type rope_parameters
    full = {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6}
    params = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": 10000.0}}
    g3 = ArchConfig.from_hf({**BARE, "rope_parameters": params}, "gemma3")
    assert g3.rope_of(FULL) == (1e6, full) and g3.rope_of(SLIDING)[0] == 10000.0


def test_phi3_longrope_and_partial_rotary():
    arch = ArchConfig.from_hf(_dict(_tiny_config("phi3"), "Phi3ForCausalLM"))
    assert arch.family == "phi3" and arch.head_dim == 16 and arch.rotary_dim == 12
    assert arch.rope_scaling["rope_type"] == "longrope"
    assert arch.long_rope_original == PHI3_ORIGINAL_MAX
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ArchConfig.from_hf({**BARE, "partial_rotary_factor": 0.7}, "phi3")
    # The same keys on a Llama are not LongRoPE.
    assert ArchConfig.from_hf(_dict(_tiny_config("phi3"), "LlamaForCausalLM")).long_rope_original is None


def test_qwen3_moe_fields():
    import transformers as tf

    hf = tf.Qwen3MoeConfig(
        **BARE, num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[1], norm_topk_prob=True,
    )  # fmt: skip
    arch = ArchConfig.from_hf(_dict(hf, "Qwen3MoeForCausalLM"))
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_intermediate_size) == (4, 2, 16)
    assert (arch.decoder_sparse_step, arch.mlp_only_layers, arch.norm_topk_prob) == (2, (1,), True)
    assert arch.shared_expert_intermediate_size is None and arch.active_mlp_width == 2 * 16
    mixtral = ArchConfig.from_hf(
        {**BARE, "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 40}
    )
    assert mixtral.num_experts == 8 and mixtral.active_mlp_width == 2 * 40


def test_opt_fields():
    import transformers as tf

    hf = tf.OPTConfig(**BARE, ffn_dim=96, max_position_embeddings=256, word_embed_proj_dim=32)
    arch = ArchConfig.from_hf(_dict(hf, "OPTForCausalLM"))
    assert (arch.family, arch.ffn_dim, arch.word_embed_proj_dim, arch.head_dim) == ("opt", 96, 32, 16)
    assert arch.tie_word_embeddings and arch.enable_bias and arch.activation_function == "relu"
    assert arch.do_layer_norm_before and not arch.remove_final_layer_norm
    assert arch.max_position_embeddings == 256
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ArchConfig.from_hf(BARE, "opt")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": None}, "num_hidden_layers"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"num_attention_heads": "four"}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ],
)
def test_bad_values_name_the_field(change, field):
    cfg = {k: v for k, v in {**BARE, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=field):
        ArchConfig.from_hf(cfg)


def test_a_model_asks_for_the_fields_it_needs():
    from distgen.models.llama import LlamaForCausalLM

    with torch.device("meta"), pytest.raises(ValueError, match="lacks intermediate_size"):
        LlamaForCausalLM(ArchConfig.from_hf(BARE), torch.float32)
