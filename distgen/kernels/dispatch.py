"""The one place that chooses between the Triton kernels and the plain-torch path.

Layers ask :func:`use_triton` with one of their input tensors; the model runner asks it once per
step to decide which attention metadata to build. The answer depends on the mode, read once from the
environment variable ``DISTGEN_KERNELS`` at import:

- ``auto`` (default): Triton for CUDA tensors, the torch path for everything else (CPU behaviour and
  speed are exactly those of the torch path);
- ``torch``: never Triton (e.g. to compare against the kernels on a GPU);
- ``triton``: always Triton; on a CPU-only machine this needs ``TRITON_INTERPRET=1`` set before triton
  is first imported, and runs the kernels in the (slow) interpreter. Tests use it through
  :func:`kernel_mode`.

The kernel modules are imported on the first Triton call only, so a CPU run never imports triton.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from distgen.envs import envs

MODES = ("auto", "torch", "triton")


def _parse(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"DISTGEN_KERNELS must be one of {MODES}, got {mode!r}")
    return mode


_state = {"mode": _parse(envs().kernels)}


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` (or on its device) go to the Triton kernels."""
    mode = _state["mode"]
    if mode == "auto":
        return x.is_cuda
    return mode == "triton"


def use_triton_on(device: torch.device) -> bool:
    """:func:`use_triton` for a device rather than a tensor (the runner's per-step decision)."""
    mode = _state["mode"]
    if mode == "auto":
        return device.type == "cuda"
    return mode == "triton"


@contextmanager
def kernel_mode(mode: str) -> Iterator[None]:
    """Run a block with another mode (tests force ``triton`` under the interpreter, or ``torch``)."""
    old = _state["mode"]
    _state["mode"] = _parse(mode)
    try:
        yield
    finally:
        _state["mode"] = old


@functools.cache
def triton_ops() -> SimpleNamespace:
    """The Triton entry points, imported on first use."""
    from distgen.kernels.activation import silu_and_mul
    from distgen.kernels.kv_store import store_kv
    from distgen.kernels.paged_attention import paged_attention_decode
    from distgen.kernels.paged_prefill import paged_attention_prefill
    from distgen.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm
    from distgen.kernels.rotary import rotary_store_kv

    return SimpleNamespace(
        rmsnorm=rmsnorm,
        fused_add_rmsnorm=fused_add_rmsnorm,
        silu_and_mul=silu_and_mul,
        rotary_store_kv=rotary_store_kv,
        store_kv=store_kv,
        paged_attention_decode=paged_attention_decode,
        paged_attention_prefill=paged_attention_prefill,
    )
