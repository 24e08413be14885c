"""Which quantized checkpoints run quantized, and the safetensors int8 weight-only format.

``quantization`` (the engine argument, vLLM's name) resolves against the checkpoint:

- ``None`` (default): the checkpoint's own. A GGUF file runs its Q8_0/Q4_0/Q4_1 linear weights
  quantized (``"gguf"``, as vLLM runs GGUF files); a Hugging Face directory whose ``config.json`` has
  a supported ``quantization_config`` runs it (``"compressed-tensors"``); anything else loads float.
- ``"gguf"`` / ``"compressed-tensors"``: the same, but an error when the checkpoint is not of that kind.
- ``"none"``: every weight dequantized to ``dtype`` at load (the float path).

The safetensors int8 format taken is compressed-tensors' ``int-quantized`` format with 8-bit
symmetric per-output-channel weights and float activations (W8A16; what llm-compressor writes for
``QuantizationScheme(weights=QuantizationArgs(num_bits=8, strategy="channel"))`` saved as
``int-quantized``): each quantized linear layer's ``<name>.weight`` is int8 ``[out, in]`` and
``<name>.weight_scale`` holds its ``[out, 1]`` scales (any float dtype; weight = scale * q); a
``<name>.weight_zero_point`` of zeros may be present. Layers the config ignores (``lm_head``)
are stored as ordinary float tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from distgen.kernels.quant import dequantize, from_int8_channel
from distgen.layers.weights import LoadedWeight, materialize

METHODS = ("gguf", "compressed-tensors", "none")


def checkpoint_quantization(hf_config: dict[str, Any], is_gguf: bool) -> str | None:
    """The quantization the checkpoint carries (``"gguf"``, ``"compressed-tensors"``) or None.

    Raises:
        ValueError: for a ``quantization_config`` distgen cannot run, naming what it holds.
    """
    if is_gguf:
        return "gguf"
    qc = hf_config.get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(
            f"quantization_config quant_method={method!r} is not supported: distgen runs GGUF files "
            "and compressed-tensors int8 weight-only (W8A16, per-channel) checkpoints"
        )
    fmt = qc.get("format")
    if fmt != "int-quantized":
        raise ValueError(f"compressed-tensors format {fmt!r} is not supported (only 'int-quantized')")
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        scheme = (w.get("num_bits"), w.get("type", "int"), w.get("symmetric", True), w.get("strategy"))
        if scheme != (8, "int", True, "channel") or group.get("input_activations"):
            raise ValueError(
                f"compressed-tensors group {name!r}: only 8-bit symmetric per-channel int weights with "
                f"float activations run here, got weights {w} and input_activations "
                f"{group.get('input_activations')}"
            )
    return "compressed-tensors"


def resolve_quantization(requested: str | None, hf_config: dict[str, Any], is_gguf: bool) -> str | None:
    """What the engine runs: the checkpoint's quantization, ``requested`` checked against it; None for
    float weights."""
    if requested is not None and requested not in METHODS:
        raise ValueError(
            f"quantization={requested!r} is not supported: None (the checkpoint's own), "
            + ", ".join(repr(m) for m in METHODS)
        )
    if requested == "none":
        return None
    held = checkpoint_quantization(hf_config, is_gguf)
    if requested is not None and requested != held:
        raise ValueError(f"quantization={requested!r}, but the checkpoint holds {held or 'float weights'}")
    return held


def _dtype(w: LoadedWeight) -> str:
    return str(w.dtype) if isinstance(w, torch.Tensor) else w.get_dtype()


def iter_int8_weights(
    weights: Iterator[tuple[str, LoadedWeight]], quantized: bool
) -> Iterator[tuple[str, LoadedWeight]]:
    """The checkpoint's weights with each int8 ``weight`` and its ``weight_scale`` joined into one
    :class:`QuantizedWeight` (dequantized to float32 when not ``quantized``)."""
    pending: dict[str, dict[str, LoadedWeight]] = {}
    for name, w in weights:
        base, _, leaf = name.rpartition(".")
        is_codes = leaf == "weight" and _dtype(w) in ("I8", "torch.int8")
        if not (is_codes or leaf in ("weight_scale", "weight_zero_point")):
            yield name, w
            continue
        entry = pending.setdefault(base, {})
        entry[leaf] = w
        if "weight" in entry and "weight_scale" in entry:
            del pending[base]
            zero = entry.get("weight_zero_point")
            if zero is not None and bool(materialize(zero).any()):
                raise ValueError(f"{base}: a non-zero weight_zero_point (asymmetric int8) is not supported")
            qw = from_int8_channel(materialize(entry["weight"]), materialize(entry["weight_scale"]))
            yield f"{base}.weight", qw if quantized else dequantize(qw)
    incomplete = [b for b, e in pending.items() if "weight" in e or "weight_scale" in e]
    if incomplete:
        raise ValueError(f"int8 checkpoint: weights without their scales (or scales alone): {incomplete[:4]}")
