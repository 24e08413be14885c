"""GGUF gemma2 / gemma3 files, written by the ``gguf`` package the way llama.cpp's converter writes them
(norm weights with 1 added, the pre-MLP norm named ``ffn_norm``, Gemma's keys), read back as the
transformers checkpoint they came from: the same config where it matters and the same parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgen.model_loader.gguf import read_gguf
from distgen.models.registry import resolve_model_class
from tests.models.test_gemma import ATTN_CAP, FINAL_CAP, WINDOW, _config

gguf = pytest.importorskip("gguf")

_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    part = rest.rsplit(".", 1)[0]
    return f"blk.{layer}.{_NAMES[part]}.weight"


def _write(path: str, arch: str, cfg, state: dict[str, torch.Tensor]) -> None:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    else:
        w.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    for name, t in state.items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp writes no output matrix
        data = t.numpy()
        if name.endswith("norm.weight"):
            data = data + np.float32(1.0)
        w.add_tensor(_gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_reads_as_the_transformers_checkpoint(arch, tmp_path):
    import transformers as tf

    cfg = _config(arch)
    if arch == "gemma3":  # llama.cpp's gemma3 files carry no rope scaling here: the default rotary
        cfg.rope_parameters["full_attention"] = {"rope_type": "default", "rope_theta": 1e6}
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.3 * torch.randn_like(p))
    state = model.state_dict()
    path = str(tmp_path / f"{arch}.gguf")
    _write(path, arch, cfg, state)

    ckpt = read_gguf(path)
    hf = ckpt.hf_config
    want_type = "gemma2" if arch == "gemma2" else "gemma3_text"
    assert (hf["model_type"], hf["tie_word_embeddings"]) == (want_type, True)
    assert (hf["sliding_window"], hf["head_dim"]) == (WINDOW, cfg.head_dim)
    assert hf["query_pre_attn_scalar"] == cfg.head_dim  # llama.cpp's rule below the 27B models
    if arch == "gemma2":
        assert (hf["attn_logit_softcapping"], hf["final_logit_softcapping"]) == (ATTN_CAP, FINAL_CAP)
    else:
        assert hf["layer_types"] == cfg.layer_types and hf["rope_local_base_freq"] == 10000.0

    dist = resolve_model_class(hf["architectures"])(hf, torch.float32)
    loaded = dist.load_weights(ckpt.iter_weights())
    assert loaded == {n for n, _ in dist.named_parameters()}
    weights = dict(ckpt.iter_weights())
    for name, t in state.items():
        if name != "lm_head.weight":
            torch.testing.assert_close(weights[name], t, rtol=0, atol=1e-6)
    # The norms hold 1 + w, as from the safetensors checkpoint.
    layer = dist.layers[0]
    torch.testing.assert_close(
        layer.pre_feedforward_layernorm.weight, state["model.layers.0.pre_feedforward_layernorm.weight"] + 1
    )
    assert [a.sliding_window for a in dist.attention_layers()] == [
        WINDOW if t == "sliding_attention" else None for t in cfg.layer_types
    ]
