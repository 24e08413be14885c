"""Python entry points of the CPU kernels (the C++ in ``csrc/``), on tensors.

Each function checks what the C side assumes (device, dtype, contiguity) and passes data pointers
through ctypes: a call costs a few microseconds, less than a torch op's dispatch. float32 and
bfloat16 run here (``DTYPES``); any other dtype stays on the torch path.
On this path each K block of the cache is stored transposed (``[Hkv, D, block_size]`` in the
memory of a ``[Hkv, block_size, D]`` block; V blocks keep the usual layout): see ``csrc/attention.cpp``.
:func:`k_cache_view` gives a cache in that layout its true shape.

Their references are the plain-torch layers (``RMSNorm``, ``SiluAndMul``, ``RotaryEmbedding`` with
``write_kv``, the torch attention path, and ``torch.argmax`` for the greedy sampler), which the tests
compare them against.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Callable, Iterator

import torch

from distgen.kernels import cpu_build

_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
DTYPES = frozenset(_SUFFIX)
_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "dg_rms_norm": [_P, _P, _P, _I, _I, _F],
    "dg_add_rms_norm": [_P, _P, _P, _I, _I, _F],
    "dg_silu_and_mul": [_P, _P, _I, _I],
    "dg_rotary_store_kv": [_P] * 12 + [_I] * 8 + [_F],
    "dg_paged_attention": [_P] * 7 + [_I] * 9 + [_F, _I, _F],
    "dg_argmax_rows": [_P, _P, _I, _I],
    "dg_pack_linear": [_P, _P, _I, _I],
    "dg_linear": [_P] * 4 + [_I] * 3,
    "dg_linear_silu": [_P] * 3 + [_I] * 3,
    "dg_qlinear": [_P] * 6 + [_I] * 4,
    "dg_qlinear_int8": [_P] * 6 + [_I] * 4,
}


@functools.cache
def _functions() -> dict[tuple[str, torch.dtype], ctypes._CFuncPtr]:
    lib = cpu_build.load()
    table = {}
    for name, argtypes in _SIGNATURES.items():
        for dtype, suffix in _SUFFIX.items():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, None
            table[(name, dtype)] = fn
    for dtype in _SUFFIX:  # returns 0 where the build has no AVX-512 VNNI
        table[("dg_qlinear_int8", dtype)].restype = ctypes.c_int64
    return table


@functools.cache
def int8_activations_available() -> bool:
    """Whether this build has the int8-activation (AVX-512 VNNI) quantized GEMM."""
    fn = cpu_build.load().dg_qlinear_int8_available
    fn.argtypes, fn.restype = [], ctypes.c_int64
    return bool(fn())


@functools.cache
def linear_bf16_on_amx() -> bool:
    """Whether the bfloat16 GEMM runs on AMX tiles here (csrc/gemm_amx.h): a CPU with AMX whose kernel
    grants the tile state."""
    fn = cpu_build.load().dg_linear_bf16_amx
    fn.argtypes, fn.restype = [], ctypes.c_int64
    return bool(fn())


# The list a recording on this thread appends each kernel call to (:mod:`distgen.kernels.cpu_record`).
_recording = threading.local()


def _fn(name: str, x: torch.Tensor) -> Callable:
    fn = _functions()[(name, x.dtype)]
    calls = getattr(_recording, "calls", None)
    if calls is None:
        return fn
    return functools.partial(_call_and_record, calls, fn)


def _call_and_record(calls: list, fn: ctypes._CFuncPtr, *args: object) -> object:
    calls.append((fn, args))
    return fn(*args)


@contextlib.contextmanager
def recording_calls(calls: list) -> Iterator[None]:
    """Append every kernel call this thread makes inside to ``calls``, as (C function, arguments),
    still making it."""
    assert getattr(_recording, "calls", None) is None, "recordings do not nest"
    _recording.calls = calls
    try:
        yield
    finally:
        _recording.calls = None


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def _rows(x: torch.Tensor) -> tuple[int, int]:
    assert x.is_contiguous(), "the CPU kernels take contiguous rows"
    return x.numel() // x.shape[-1], x.shape[-1]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    out = torch.empty_like(x)
    rows, h = _rows(x)
    _fn("dg_rms_norm", x)(out.data_ptr(), x.data_ptr(), weight.data_ptr(), rows, h, eps)
    return out


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``, written over ``x`` and ``residual``."""
    rows, h = _rows(x)
    assert residual.is_contiguous() and residual.shape == x.shape and residual.dtype == x.dtype
    _fn("dg_add_rms_norm", x)(x.data_ptr(), residual.data_ptr(), weight.data_ptr(), rows, h, eps)
    return x, residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    rows, two_i = _rows(x)
    out = x.new_empty(*x.shape[:-1], two_i // 2)
    _fn("dg_silu_and_mul", x)(out.data_ptr(), x.data_ptr(), rows, two_i // 2)
    return out


def pack_linear(dst: torch.Tensor, weight: torch.Tensor, n: int, k: int) -> None:
    """Writes the contiguous weight [n, k] into ``dst`` in the GEMM's panel layout (see cpu_gemm)."""
    assert weight.is_contiguous() and dst.is_contiguous() and dst.dtype == weight.dtype
    _fn("dg_pack_linear", weight)(dst.data_ptr(), weight.data_ptr(), n, k)


def linear(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``out = x @ W.T + bias`` for contiguous x [..., k] and out [..., n], W packed by pack_linear."""
    rows, k = _rows(x)
    n = out.shape[-1]
    assert out.is_contiguous() and out.dtype == x.dtype == packed.dtype
    assert bias is None or (bias.is_contiguous() and bias.dtype == x.dtype and bias.numel() == n)
    _fn("dg_linear", x)(out.data_ptr(), x.data_ptr(), packed.data_ptr(), _ptr(bias), rows, n, k)


def linear_silu(out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor) -> None:
    """``out = silu(x @ G.T) * (x @ U.T)`` for contiguous x [..., k] and out [..., inter], with the gate
    G and up U weights packed by pack_linear from their 16-row panels in turns (cpu_gemm.pack_gate_up)."""
    rows, k = _rows(x)
    inter = out.shape[-1]
    assert out.is_contiguous() and out.dtype == x.dtype == packed.dtype
    _fn("dg_linear_silu", x)(out.data_ptr(), x.data_ptr(), packed.data_ptr(), rows, inter, k)


def qlinear(
    out: torch.Tensor,
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor | None,
    bias: torch.Tensor | None,
    fmt_id: int,
    int8_activations: bool = False,
) -> None:
    """``out = x @ W.T + bias`` with W quantized (``distgen.kernels.quant``; ``fmt_id`` its
    ``FORMAT_ID``), dequantized inside the product; contiguous x [..., k] and out [..., n]. With
    ``int8_activations`` x is quantized per block of 32 and multiplied in int8 (AVX-512 VNNI; see
    :func:`int8_activations_available`)."""
    rows, k = _rows(x)
    n = out.shape[-1]
    assert out.is_contiguous() and out.dtype == x.dtype
    assert codes.is_contiguous() and scales.is_contiguous() and (mins is None or mins.is_contiguous())
    assert codes.shape[0] == n and (bias is None or (bias.is_contiguous() and bias.dtype == x.dtype))
    name = "dg_qlinear_int8" if int8_activations else "dg_qlinear"
    ran = _fn(name, x)(
        out.data_ptr(),
        x.data_ptr(),
        codes.data_ptr(),
        scales.data_ptr(),
        _ptr(mins),
        _ptr(bias),
        rows,
        n,
        k,
        fmt_id,
    )
    assert not int8_activations or ran == 1, "this build has no int8-activation kernel"


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` for contiguous rows, with torch's answer on ties (the first index) and NaN
    (its first index); int64 indices of shape ``x.shape[:-1]``."""
    rows, n = _rows(x)
    assert n > 0, "argmax of an empty row"
    out = torch.empty(x.shape[:-1], dtype=torch.int64)
    _fn("dg_argmax_rows", x)(out.data_ptr(), x.data_ptr(), rows, n)
    return out


def k_cache_view(k_cache: torch.Tensor) -> torch.Tensor:
    """The K cache [blocks, Hkv, bs, D] of this path seen as what it holds: [blocks, Hkv, D, bs]."""
    n, hkv, bs, d = k_cache.shape
    return k_cache.view(n, hkv, d, bs)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, q: torch.Tensor) -> tuple[int, int]:
    """(Hkv, block size), from the V cache [blocks, Hkv, bs, D]; K holds as many transposed blocks."""
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "the caches must be contiguous"
    assert k_cache.dtype == v_cache.dtype == q.dtype and k_cache.numel() == v_cache.numel()
    return v_cache.shape[1], v_cache.shape[2]


def check_head_map(num_heads: int, num_kv_heads: int, group: int | None, head_offset: int) -> int:
    """The group size of a head map in which query head j reads KV head (j + head_offset) // group,
    checked to use every KV head and no other."""
    if group is None:
        assert head_offset == 0 and num_heads % num_kv_heads == 0, (
            f"{num_heads} query heads over {num_kv_heads} KV heads need a group and an offset"
        )
        return num_heads // num_kv_heads
    assert 0 <= head_offset < group, f"head offset {head_offset} outside a group of {group}"
    last = (num_heads - 1 + head_offset) // group
    assert last == num_kv_heads - 1, (
        f"{num_heads} query heads at offset {head_offset} in groups of {group} read {last + 1} KV heads, "
        f"not {num_kv_heads}"
    )
    return group


def _token_stride(x: torch.Tensor) -> int:
    """Elements between tokens of a [T, heads, D] view whose heads and dims are packed."""
    t, h, d = x.shape
    assert x.stride(2) == 1 and x.stride(1) == d, "heads must be packed inside a token"
    return x.stride(0)


def rotary_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_block: torch.Tensor,
    slot_offset: torch.Tensor,
    positions: torch.Tensor | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    qk_norm: tuple[torch.Tensor, torch.Tensor] | None = None,
    eps: float = 0.0,
) -> None:
    """Rotate q [T, H, D] and k [T, Hkv, D] in place by ``positions`` (after the per-head norms
    ``qk_norm``, when given), then store k and v at their slots of the caches (V [blocks, Hkv, bs,
    D], K the same blocks transposed). Without ``positions`` only the store happens."""
    t, h, d = q.shape
    hkv, bs = _check_caches(k_cache, v_cache, q)
    assert slot_block.dtype == slot_offset.dtype == torch.int64
    if positions is not None:
        assert positions.dtype == torch.int64 and cos.dtype == sin.dtype == torch.float32
        assert cos.is_contiguous() and sin.is_contiguous() and cos.shape[-1] * 2 == d
    qn, kn = qk_norm if qk_norm is not None else (None, None)
    _fn("dg_rotary_store_kv", q)(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        _ptr(qn),
        _ptr(kn),
        _ptr(positions),
        _ptr(cos),
        _ptr(sin),
        slot_block.data_ptr(),
        slot_offset.data_ptr(),
        t,
        h,
        hkv,
        d,
        bs,
        _token_stride(q),
        _token_stride(k),
        _token_stride(v),
        eps,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    group: int | None = None,
    head_offset: int = 0,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of every row's queries over its cached context, read in place through its block
    table. q [T, H, D] (row i's queries are q[query_start[i]:query_start[i+1]], the last ones of
    its ``seq_lens[i]`` tokens, causal among themselves); V cache [blocks, Hkv, bs, D], K the same
    blocks transposed; int32 tables, lengths and starts. Returns (or fills) a contiguous [T, H, D].

    Query head j reads KV head ``(j + head_offset) // group`` (``group`` defaults to H / Hkv): a
    tensor-parallel rank whose heads start inside a KV group passes its offset.

    ``window``: a sliding window of that many keys (a query sees itself and the ``window - 1`` keys
    before it); ``softcap``: scores become ``softcap * tanh(score / softcap)`` before the softmax."""
    assert window is None or window > 0, f"sliding window {window} must be positive"
    assert softcap is None or softcap > 0, f"softcap {softcap} must be positive"
    t, h, d = q.shape
    hkv, bs = _check_caches(k_cache, v_cache, q)
    group = check_head_map(h, hkv, group, head_offset)
    for name, x in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start", query_start)):
        assert x.dtype == torch.int32 and x.is_contiguous(), f"{name} must be contiguous int32"
    if out is None:
        out = q.new_empty(t, h, d)
    assert out.is_contiguous()
    _fn("dg_paged_attention", q)(
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        seq_lens.data_ptr(),
        query_start.data_ptr(),
        seq_lens.numel(),
        h,
        hkv,
        d,
        bs,
        group,
        head_offset,
        _token_stride(q),
        block_tables.stride(0),
        scale,
        window or 0,
        softcap or 0.0,
    )
    return out
