"""Resolve a model reference into its config, tokenizer, generation defaults and weights."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from distgen.arch_config import ArchConfig
from distgen.model_loader import hub
from distgen.model_loader.safetensors import iter_safetensors
from distgen.models.registry import resolve_model_class
from distgen.sampling_params import SamplingParams

logger = logging.getLogger("distgen")


@dataclass
class ModelSource:
    """Where a model's parts come from: a Hugging Face directory or a GGUF file."""

    path: str
    hf_config: dict[str, Any]
    is_gguf: bool
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    # How the weights run (distgen.model_loader.quantization): "gguf", "compressed-tensors" or None
    # (float). resolve_model leaves None; the engine arguments resolve it.
    quantization: str | None = None

    @cached_property
    def arch(self) -> ArchConfig:
        """``hf_config`` resolved into the typed architecture the models read (once per source: a
        changed config, as ``hf_overrides`` give, comes as a new source)."""
        return ArchConfig.from_hf(self.hf_config)

    def iter_weights(self):
        if self.is_gguf:
            from distgen.model_loader.gguf import read_gguf

            return read_gguf(self.path).iter_weights(quantized=self.quantization == "gguf")
        weights = iter_safetensors(self.path)
        if self.hf_config.get("quantization_config"):
            from distgen.model_loader.quantization import iter_int8_weights

            return iter_int8_weights(weights, quantized=self.quantization == "compressed-tensors")
        return weights

    def load_tokenizer(self, tokenizer: str | None = None):
        from transformers import AutoTokenizer

        if tokenizer is not None:
            return AutoTokenizer.from_pretrained(tokenizer)
        if self.is_gguf:
            from distgen.model_loader.gguf import read_gguf

            return read_gguf(self.path).load_tokenizer()
        return AutoTokenizer.from_pretrained(self.path)


def local_path(
    model: str | os.PathLike,
    what: str = "model",
    revision: str | None = None,
    download_dir: str | None = None,
) -> str:
    """The local file or directory ``model`` names: a path, or a Hugging Face hub id (``org/name``,
    ``org/name:file.gguf``) found in the hub cache or downloaded into it (:mod:`.hub`)."""
    model = os.fspath(model)
    path = os.path.abspath(os.path.expanduser(model))
    if os.path.exists(path):
        if revision is not None:
            logger.info("revision %r has no effect: %s %r is a local path", revision, what, model)
        return path
    if hub.looks_like_repo_id(model):
        return hub.download(model, revision, download_dir, what)
    raise FileNotFoundError(
        f"{what} {model!r} not found: give a local Hugging Face directory, a .gguf file, or a hub id "
        "(org/name, or org/name:file.gguf for one GGUF file of a repository)"
    )


def resolve_model(
    model: str | None, revision: str | None = None, download_dir: str | None = None
) -> ModelSource:
    """``None`` -> the embedded SmolLM2 default; a ``.gguf`` file; a Hugging Face directory; or a hub
    id, downloaded when the cache lacks it."""
    if model is None:
        from distgen.model_loader.gguf import default_model_path

        model = default_model_path()
    path = local_path(model, "model", revision, download_dir)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model file {path!r} is not a .gguf file")
        from distgen.model_loader.gguf import read_gguf

        return ModelSource(path, read_gguf(path).hf_config, is_gguf=True)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json: is it a Hugging Face model directory?")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    return ModelSource(path, hf_config, is_gguf=False)


# generation_config.json's keys that become sampling defaults
GENERATION_KEYS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
    "do_sample",
)


def load_generation_config(
    source: ModelSource, generation_config: str, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Sampling defaults from ``generation_config.json`` ("auto"), none ("distgen"), or a path, with
    ``overrides`` (generation-config keys, as vLLM's ``override_generation_config``) laid over them.

    Returns the keys that map onto SamplingParams, with ``max_new_tokens`` renamed ``max_tokens``.
    """
    path = _generation_config_path(source, generation_config)
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = json.load(f)
    if overrides:
        unknown = sorted(set(overrides) - set(GENERATION_KEYS))
        if unknown:
            raise ValueError(
                f"override_generation_config: unknown key(s) {', '.join(unknown)}; it takes "
                f"{', '.join(GENERATION_KEYS)}"
            )
        raw = {**raw, **overrides}
        path = f"{path or 'generation defaults'} with override_generation_config"
    # null means "not set" there (some checkpoints write it), not a value.
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
    out = {k: raw[k] for k in keys if raw.get(k) is not None}
    if raw.get("max_new_tokens") is not None:
        out["max_tokens"] = raw["max_new_tokens"]
    if raw.get("do_sample") is False and "temperature" not in out:
        out["temperature"] = 0.0
    try:  # at start, not as every request's error
        SamplingParams(**out)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None
    return out


def _generation_config_path(source: ModelSource, generation_config: str) -> str | None:
    if generation_config == "distgen":
        return None
    if generation_config == "auto":
        path = os.path.join(source.path, "generation_config.json")
        return None if source.is_gguf or not os.path.exists(path) else path
    path = generation_config
    if os.path.isdir(path):
        path = os.path.join(path, "generation_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"generation_config {generation_config!r} not found")
    return path


def generation_eos_ids(source: ModelSource, generation_config: str) -> list[int]:
    """EOS ids listed by generation_config.json (they end generation like the tokenizer's EOS)."""
    if source.is_gguf or generation_config == "distgen":
        return []
    path = (
        os.path.join(source.path, "generation_config.json")
        if generation_config == "auto"
        else generation_config
    )
    if not os.path.exists(path):
        return []
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def build_model(source: ModelSource, dtype: torch.dtype, device: str) -> nn.Module:
    """Construct the model (sharded for this rank) and fill every parameter from the checkpoint."""
    cls = resolve_model_class(source.hf_config.get("architectures"))
    with torch.device(device):
        model = cls(source.arch, dtype)
    loaded = model.load_weights(source.iter_weights())
    expected = {n for n, _ in model.named_parameters()}
    missing = expected - loaded
    if missing:
        raise ValueError(f"checkpoint {source.path} lacks weights for: {sorted(missing)[:8]}")
    return model.eval()
