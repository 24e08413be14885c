"""The one place that chooses between the Triton kernels, the CPU kernels and the plain-torch path.

Layers ask :func:`use_triton` / :func:`use_cpu_kernels` with one of their input tensors; the model
runner asks :func:`attention_path` once per step to decide which attention metadata to build, and the
loader asks :func:`use_cpu_kernels_for` whether to pack the weights. The answer depends on the mode,
read once from the environment variable ``DISTGEN_KERNELS`` at import:

- ``auto`` (default): Triton for CUDA tensors; the CPU kernels (:mod:`distgen.kernels.cpu_ops`, with
  weights packed for its GEMM) for float32 and bfloat16 CPU tensors when they build on this machine;
  the torch path for everything else;
- ``torch``: never a kernel: the plain-torch reference, everywhere;
- ``triton``: always Triton; on a CPU-only machine this needs ``TRITON_INTERPRET=1`` set before triton
  is first imported, and runs the kernels in the (slow) interpreter. Tests use it through
  :func:`kernel_mode`;
- ``cpu``: the CPU kernels for CPU tensors, and an error where they cannot be built.

The kernel modules are imported on first use, so a CPU run never imports triton.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import torch

from distgen.envs import envs
from distgen.kernels import cpu_build, cpu_ops

MODES = ("auto", "torch", "triton", "cpu")


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


def use_cpu_kernels_for(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` on ``device`` go to the CPU kernels (and weights get packed)."""
    return device.type == "cpu" and _cpu_takes(dtype)


def _cpu_takes(dtype: torch.dtype) -> bool:
    mode = _state["mode"]
    if mode not in ("auto", "cpu") or dtype not in cpu_ops.DTYPES:
        return False
    if mode == "cpu":
        cpu_build.load()  # raises, naming what is missing
        return True
    return cpu_build.try_load() is not None


def use_cpu_kernels(x: torch.Tensor) -> bool:
    """:func:`use_cpu_kernels_for` the tensor's device and dtype (asked per layer call: ``is_cpu``, where
    building a ``torch.device`` each time cost about 1% of a one-stream decode step)."""
    return x.is_cpu and _cpu_takes(x.dtype)


def attention_path(device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: which attention (and metadata) a step uses."""
    if use_triton_on(device):
        return "triton"
    return "cpu" if use_cpu_kernels_for(device, dtype) else "torch"


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
def cpu_kernels() -> SimpleNamespace:
    """The CPU kernels' entry points (:mod:`distgen.kernels.cpu_ops`) and the packed GEMM."""
    from distgen.kernels import cpu_gemm

    return SimpleNamespace(
        rms_norm=cpu_ops.rms_norm,
        fused_add_rms_norm=cpu_ops.fused_add_rms_norm,
        silu_and_mul=cpu_ops.silu_and_mul,
        rotary_store_kv=cpu_ops.rotary_store_kv,
        paged_attention=cpu_ops.paged_attention,
        argmax_rows=cpu_ops.argmax_rows,
        pack_linear=cpu_gemm.pack,
        packed_linear=cpu_gemm.linear,
        pack_gate_up=cpu_gemm.pack_gate_up,
        packed_linear_silu=cpu_gemm.linear_silu,
    )


@functools.cache
def triton_ops() -> SimpleNamespace:
    """The Triton entry points, imported on first use."""
    from distgen.kernels.activation import silu_and_mul
    from distgen.kernels.fused_moe import fused_moe
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
        fused_moe=fused_moe,
        paged_attention_decode=paged_attention_decode,
        paged_attention_prefill=paged_attention_prefill,
    )
