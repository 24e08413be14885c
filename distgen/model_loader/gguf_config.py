"""A GGUF file's metadata as the ``config.json`` of the Hugging Face model it holds."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from distgen.model_loader.gguf_file import GGUFFile

logger = logging.getLogger(__name__)

# GGUF ``general.architecture`` -> (HF ``architectures[0]``, HF ``model_type``).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma2": ("Gemma2ForCausalLM", "gemma2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
}


def field_of(reader: GGUFFile, key: str, default: Any = None) -> Any:
    value = reader.metadata.get(key, default)
    return value.tolist() if isinstance(value, np.ndarray) else value


def build_hf_config(reader: GGUFFile, arch: str) -> dict:
    """The ``config.json``-equivalent of the file's metadata."""
    hf_arch, model_type = SUPPORTED_ARCHITECTURES[arch]

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
    return config


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
