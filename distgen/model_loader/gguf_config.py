"""A GGUF file's metadata as the ``config.json`` of the Hugging Face model it holds, and the per-family
GGUF -> Hugging Face tensor names that differ from Llama's."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from distgen.model_loader.gguf_file import GGUFFile, dequantize

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` -> (HF ``architectures[0]``, HF ``model_type``).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}
# llama.cpp files Mixtral as ``llama`` with an expert count.
MIXTRAL = ("MixtralForCausalLM", "mixtral")

# Per-layer tensor names beyond Llama's, by HF model_type. Phi-3's ``attn_qkv`` stacks q, k, v and its
# ``ffn_up`` stacks gate and up, as HF's ``qkv_proj`` / ``gate_up_proj`` do. The MoE families' stacked
# expert tensors (``ffn_{gate,up,down}_exps``, ``[experts, out, in]``) map to these names and are cut
# into one tensor per expert by the reader.
_MOE_NAMES = {
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
FAMILY_BLOCK_NAMES: dict[str, dict[str, str]] = {
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "mixtral": _MOE_NAMES,
    "qwen2_moe": _MOE_NAMES,
    "qwen3_moe": _MOE_NAMES,
}
# Phi-3's LongRoPE factors, read into the config (HF has no parameter for them).
ROPE_FACTOR_TENSORS = frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})


def field_of(reader: GGUFFile, key: str, default: Any = None) -> Any:
    value = reader.metadata.get(key, default)
    return value.tolist() if isinstance(value, np.ndarray) else value


def build_hf_config(reader: GGUFFile, arch: str) -> dict:
    """The ``config.json``-equivalent of the file's metadata."""
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]
    if arch == "llama" and field_of(reader, "llama.expert_count"):
        hf_arch, model_type = MIXTRAL

    def get(key: str, default: Any = None) -> Any:
        return field_of(reader, f"{arch}.{key}", default)

    tensor_names = {t.name for t in reader.tensors}
    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv_heads = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv_heads, list):  # per-layer list in some files; these models are uniform
        n_kv_heads = max(n_kv_heads)
    head_dim = get("attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = get("rope.dimension_count")
    if head_dim is None:
        head_dim = hidden // n_heads

    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.metadata.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        else:  # token_embd is [vocab, hidden] in numpy order
            vocab = next(t.shape[0] for t in reader.tensors if t.name == "token_embd.weight")

    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv_heads),
        "head_dim": int(head_dim),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    for key in ("bos", "eos", "padding"):
        token_id = field_of(reader, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)

    scaling = get("rope.scaling.type")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
    elif scaling not in (None, "none"):
        logger.warning("GGUF rope scaling %r is not mapped; it is ignored.", scaling)
    if "rope_freqs.weight" in tensor_names:
        logger.warning("GGUF file has a rope_freqs tensor (llama3-style rope scaling); it is ignored.")
    if arch in ("gemma2", "gemma3"):
        config.update(_gemma_config(get, arch, config))
    elif arch == "phi3":
        config.update(_phi3_config(reader, get, config))
    elif model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        config.update(_moe_config(get, model_type, config, tensor_names))
    return config


def _phi3_config(reader: GGUFFile, get: Any, config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's partial rotary (``rope.dimension_count`` of ``head_dim``), its sliding window (0 for none)
    and LongRoPE: the factors are the ``rope_factors_*`` tensors, the original length and the attention
    factor metadata keys."""
    rotary_dim = int(get("rope.dimension_count", config["head_dim"]))
    window = get("attention.sliding_window")
    out: dict[str, Any] = {
        "partial_rotary_factor": rotary_dim / config["head_dim"],
        "sliding_window": int(window) if window else None,
    }
    factors = {t.name: t for t in reader.tensors if t.name in ROPE_FACTOR_TENSORS}
    if factors:
        if len(factors) != 2:
            raise ValueError(f"GGUF phi3 file has {sorted(factors)} but needs both long and short factors")
        original = int(get("rope.scaling.original_context_length", config["max_position_embeddings"]))
        scaling: dict[str, Any] = {
            "rope_type": "longrope",
            "long_factor": dequantize(factors["rope_factors_long.weight"]).reshape(-1).tolist(),
            "short_factor": dequantize(factors["rope_factors_short.weight"]).reshape(-1).tolist(),
            "original_max_position_embeddings": original,
        }
        attn = get("rope.scaling.attn_factor")
        if attn is not None:
            scaling["attention_factor"] = float(attn)
        out["rope_scaling"] = scaling
        out["original_max_position_embeddings"] = original
    return out


def _moe_config(get: Any, model_type: str, config: dict[str, Any], tensor_names: set[str]) -> dict[str, Any]:
    """The experts' sizes and routing. Layers without a router (``ffn_gate_inp``) are dense ones
    (Qwen's ``mlp_only_layers``). llama.cpp always renormalises Mixtral's and Qwen3-MoE's top-k weights
    and never Qwen2-MoE's unless the file says (``expert_weights_norm``)."""
    experts, used = get("expert_count"), get("expert_used_count")
    if not experts or not used:
        raise ValueError(f"GGUF {model_type} file lacks expert_count / expert_used_count metadata")
    if model_type == "mixtral":
        return {"num_local_experts": int(experts), "num_experts_per_tok": int(used), "sliding_window": None}
    n_layers = config["num_hidden_layers"]
    out: dict[str, Any] = {
        "num_experts": int(experts),
        "num_experts_per_tok": int(used),
        "moe_intermediate_size": int(get("expert_feed_forward_length", config["intermediate_size"])),
        "norm_topk_prob": bool(get("expert_weights_norm", model_type == "qwen3_moe")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
    }
    if model_type == "qwen2_moe":
        shared = get("expert_shared_feed_forward_length")
        if shared is None:
            raise ValueError("GGUF qwen2moe file lacks expert_shared_feed_forward_length metadata")
        out["shared_expert_intermediate_size"] = int(shared)
        out["qkv_bias"] = config["attention_bias"]
    return out


def _gemma_config(get: Any, arch: str, config: dict[str, Any]) -> dict[str, Any]:
    """Gemma's keys beyond Llama's. The file does not hold ``query_pre_attn_scalar``: llama.cpp scales
    by head_dim ** -0.5, but by (hidden / heads) ** -0.5 in the 27B models (46 layers in Gemma 2, 62 in
    Gemma 3), as their configs say; Gemma 3's local rotary base is 10000 unless the file gives one."""
    big = config["num_hidden_layers"] == (46 if arch == "gemma2" else 62)
    out: dict[str, Any] = {
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": get("attention.sliding_window"),
        "query_pre_attn_scalar": config["hidden_size"] // config["num_attention_heads"]
        if big
        else config["head_dim"],
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
    }
    pattern = get("attention.sliding_window_pattern")
    if isinstance(pattern, list):  # per layer: True for a sliding layer
        out["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
    elif pattern is not None:
        out["sliding_window_pattern"] = int(pattern)
    if arch == "gemma3":
        out["rope_local_base_freq"] = float(get("rope.freq_base_swa", 10000.0))
    return out
