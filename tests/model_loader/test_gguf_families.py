"""GGUF phi3, qwen3moe, qwen2moe and Mixtral (``llama`` with experts) files, written by the ``gguf``
package the way llama.cpp's converter lays them out (Phi-3's fused ``attn_qkv`` / ``ffn_up`` and its
LongRoPE factors as tensors, the experts stacked per layer, llama's q/k rows permuted), read back as
the transformers model they came from: the config field by field, the weights, and greedy float32
tokens equal to transformers' (DESIGN.md's rule)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distgen import LLM, SamplingParams
from distgen.model_loader.gguf import read_gguf
from distgen.models.registry import resolve_model_class
from tests.conftest import _tiny_config, check_greedy_close, hf_greedy, random_prompts
from tests.models.test_moe import moe_config

gguf = pytest.importorskip("gguf")

MAX_NEW = 8
PROMPTS = random_prompts(3, seed=21, hi=40)  # 13, 3, 30 tokens: the last decodes past phi3's original 32
FAMILIES = {"phi3": "phi3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}

_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3: gate and up stacked
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp",
    "mlp.shared_expert.down_proj": "ffn_down_shexp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp",
}
_GLOBALS = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}


def _config(family: str):
    return _tiny_config("phi3") if family == "phi3" else moe_config(family)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter permute of q/k rows (rotate-half -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(family: str, cfg, state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, t in state.items():
        data = t.numpy()
        if name == "lm_head.weight":
            out["output.weight"] = data
        elif name in _GLOBALS:
            out[_GLOBALS[name]] = data
        else:
            _, _, layer, rest = name.split(".", 3)
            if rest == "mlp.experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
                half = data.shape[1] // 2
                out[f"blk.{layer}.ffn_gate_exps.weight"] = data[:, :half]
                out[f"blk.{layer}.ffn_up_exps.weight"] = data[:, half:]
                continue
            if rest == "mlp.experts.down_proj":
                out[f"blk.{layer}.ffn_down_exps.weight"] = data
                continue
            part, kind = rest.rsplit(".", 1)
            if family == "mixtral" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = cfg.num_attention_heads if part.endswith("q_proj") else cfg.num_key_value_heads
                data = _permute(data, heads)
            if part == "mlp.shared_expert_gate":
                data = data.reshape(-1)  # llama.cpp declares it [hidden]
            out[f"blk.{layer}.{_NAMES[part]}.{kind}"] = data
    if family == "phi3":
        rope = cfg.rope_parameters
        out["rope_factors_long.weight"] = np.asarray(rope["long_factor"], dtype=np.float32)
        out["rope_factors_short.weight"] = np.asarray(rope["short_factor"], dtype=np.float32)
    return out


def _write(path: str, family: str, cfg, state: dict[str, torch.Tensor]) -> None:
    w = gguf.GGUFWriter(path, FAMILIES[family])
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = _head_dim(cfg)
    if family == "phi3":  # as convert_hf_to_gguf's Phi3MiniModel writes it
        original = cfg.original_max_position_embeddings
        w.add_rope_dimension_count(int(cfg.partial_rotary_factor * head_dim))
        w.add_sliding_window(0)
        w.add_rope_scaling_orig_ctx_len(original)
        scale = cfg.max_position_embeddings / original
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(original)))
    else:
        w.add_expert_count(cfg.num_local_experts if family == "mixtral" else cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if family == "mixtral":
            w.add_rope_dimension_count(head_dim)
        else:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if family == "qwen2_moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    for name, data in _gguf_tensors(family, cfg, state).items():
        w.add_tensor(name, np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _check_config(family: str, cfg, hf: dict) -> None:
    common = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for key in (*common, "num_key_value_heads", "vocab_size", "max_position_embeddings"):
        assert hf[key] == getattr(cfg, key), key
    assert hf["rms_norm_eps"] == pytest.approx(cfg.rms_norm_eps)
    assert hf["rope_theta"] == cfg.rope_parameters["rope_theta"]
    assert hf["tie_word_embeddings"] is False and hf["model_type"] == family
    if family == "phi3":
        assert hf["head_dim"] == 16 and hf["partial_rotary_factor"] == cfg.partial_rotary_factor
        assert hf["sliding_window"] is None and hf["attention_bias"] is False
        scaling = hf["rope_scaling"]
        assert scaling["rope_type"] == "longrope"
        assert hf["original_max_position_embeddings"] == scaling["original_max_position_embeddings"] == 32
        for key in ("long_factor", "short_factor"):
            assert scaling[key] == pytest.approx(cfg.rope_parameters[key])
        assert scaling["attention_factor"] == pytest.approx(math.sqrt(2))  # factor 1024 / 32
        return
    assert (hf["num_experts_per_tok"], hf["head_dim"]) == (cfg.num_experts_per_tok, _head_dim(cfg))
    if family == "mixtral":
        assert hf["architectures"] == ["MixtralForCausalLM"]
        assert hf["num_local_experts"] == cfg.num_local_experts
        assert hf["sliding_window"] is None
        return
    for key in ("num_experts", "moe_intermediate_size", "norm_topk_prob", "mlp_only_layers"):
        assert hf[key] == getattr(cfg, key), key
    if family == "qwen2_moe":
        assert hf["shared_expert_intermediate_size"] == cfg.shared_expert_intermediate_size
        assert hf["qkv_bias"] is True


def _check_weights(ckpt, state: dict[str, torch.Tensor]) -> None:
    weights = dict(ckpt.iter_weights())
    assert list(weights) == ckpt.weight_names()
    for name, t in state.items():
        prefix = name.rsplit(".", 1)[0]  # model.layers.N.mlp.experts
        if name.endswith("experts.gate_up_proj"):
            gate, up = t.chunk(2, dim=1)
            for e in range(t.shape[0]):
                assert torch.equal(weights[f"{prefix}.{e}.gate_proj.weight"], gate[e])
                assert torch.equal(weights[f"{prefix}.{e}.up_proj.weight"], up[e])
        elif name.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                assert torch.equal(weights[f"{prefix}.{e}.down_proj.weight"], t[e])
        else:
            torch.testing.assert_close(weights[name], t, rtol=0, atol=0)


def _tiny(family: str, tmp_path):
    """The tiny transformers model, its state dict and the GGUF file written from it."""
    import transformers as tf

    cfg = _config(family)
    torch.manual_seed(0)
    extra = {} if family == "phi3" else {"experts_implementation": "eager"}
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, **extra).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = str(tmp_path / f"{family}.gguf")
    _write(path, family, cfg, state)
    return cfg, model, state, path


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_family_reads_as_the_transformers_checkpoint(family, tmp_path):
    cfg, _, state, path = _tiny(family, tmp_path)
    ckpt = read_gguf(path)
    _check_config(family, cfg, ckpt.hf_config)
    _check_weights(ckpt, state)
    dist = resolve_model_class(ckpt.hf_config["architectures"])(ckpt.hf_config, torch.float32)
    assert dist.load_weights(ckpt.iter_weights()) == {n for n, _ in dist.named_parameters()}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_family_generates_as_transformers(family, tmp_path, smollm2_tokenizer):
    """``LLM`` on the GGUF file, float32, gives transformers' greedy tokens on the original model."""
    _, model, _, path = _tiny(family, tmp_path)
    refs = hf_greedy(model, PROMPTS, MAX_NEW)
    tok_dir = str(tmp_path / "tokenizer")
    smollm2_tokenizer.save_pretrained(tok_dir)
    llm = LLM(path, tokenizer=tok_dir, quantization="none", dtype="float32", seed=0, kv_cache_memory=8 << 20)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        rate = check_greedy_close(refs, [o.outputs[0].token_ids for o in outs], f"gguf-{family}")
        assert rate >= 2 / 3, f"{family}: only {rate:.0%} of sequences match exactly"
    finally:
        llm.shutdown()


def test_quantized_phi3_rows_follow_the_partial_rotary_permutation():
    """A Q8_0 q/k matrix (a quantized GGUF phi3) is permuted for the partial rotary as its float
    equivalent is: whole rows move, blocks and scales with them."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    from distgen.kernels.quant import GGUF_FORMATS, dequantize, from_ggml_blocks
    from distgen.models.phi3 import partial_rotary_perm, permute_heads

    rng = np.random.default_rng(0)
    data = rng.standard_normal((4 * 16, 64)).astype(np.float32)
    raw = quantize(data, GGMLQuantizationType.Q8_0)
    qw = from_ggml_blocks(GGUF_FORMATS["Q8_0"], raw, data.shape)
    perm = partial_rotary_perm(16, 12)
    assert not torch.equal(perm, torch.arange(16))
    torch.testing.assert_close(
        dequantize(permute_heads(qw, perm)), permute_heads(dequantize(qw), perm), rtol=0, atol=0
    )
