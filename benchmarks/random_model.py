"""Random-weight Hugging Face model directories for the GPU scripts (nothing comes from a model hub).

A directory holds ``config.json``, the safetensors weights saved by ``transformers`` and a word-level
tokenizer with one token per id (``<i>``), which is all ``LLM(...)`` needs to load it.
"""

from __future__ import annotations

from typing import Any

import torch

# Llama-3.2-1B's shape (issue 6): the figures in benchmarks/GPU_NOTES.md are for this model.
LLAMA_1B: dict[str, Any] = dict(
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_theta=500000.0,
    rope_scaling=dict(
        rope_type="llama3",
        factor=32.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    ),
    rms_norm_eps=1e-5,
)

# The same code paths at a size a CPU runs in seconds (``benchmarks/gpu.py --tiny``).
LLAMA_TINY: dict[str, Any] = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
    tie_word_embeddings=True,
    max_position_embeddings=1024,
)

_SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_configs(vocab: int = 4096) -> dict[str, Any]:
    """Small random models of the architectures with different attention paths, for greedy checks."""
    import transformers as tf

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        initializer_range=0.1,
        **_SPECIAL,
    )
    return {
        "llama": tf.LlamaConfig(
            **common, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True
        ),
        "qwen3": tf.Qwen3Config(
            **common,
            intermediate_size=128,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            use_sliding_window=False,
        ),
        "opt": tf.OPTConfig(
            **{k: v for k, v in common.items() if k != "initializer_range"},
            ffn_dim=128,
            word_embed_proj_dim=64,
            init_std=0.1,
        ),
    }


def save_word_tokenizer(path: str, vocab_size: int) -> None:
    """A whitespace-split word-level tokenizer whose token ``<i>`` has id ``i``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<2>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<0>", eos_token="<1>", pad_token="<1>", unk_token="<2>"
    )
    fast.save_pretrained(path)


def llama_config(shape: dict[str, Any]):
    import transformers as tf

    return tf.LlamaConfig(**shape, **_SPECIAL)


def build_random_model(config, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A ``transformers`` causal LM of ``config`` with its own random initialisation, on ``device``."""
    import transformers as tf

    torch.manual_seed(seed)
    with torch.device(device):
        model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_model_dir(model: torch.nn.Module, path: str) -> None:
    """Save ``model`` (weights and config) and a matching word-level tokenizer into ``path``."""
    model.save_pretrained(path)
    save_word_tokenizer(path, model.config.vocab_size)
