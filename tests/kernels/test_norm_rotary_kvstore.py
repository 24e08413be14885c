"""Triton RMSNorm / SiLU-and-mul / rotary + KV-store / KV-store kernels vs their torch references, and the
references vs the layers.

Runs on the CPU through the Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported).
"""

from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from distgen.kernels.activation import silu_and_mul  # noqa: E402
from distgen.kernels.dispatch import kernel_mode  # noqa: E402
from distgen.kernels.kv_store import store_kv, store_kv_ref  # noqa: E402
from distgen.kernels.reference import fused_add_rmsnorm_ref, rmsnorm_ref, silu_and_mul_ref  # noqa: E402
from distgen.kernels.rmsnorm import fused_add_rmsnorm, rmsnorm  # noqa: E402
from distgen.kernels.rotary import rotary_store_kv, rotary_store_kv_ref  # noqa: E402
from distgen.layers.activation import SiluAndMul  # noqa: E402
from distgen.layers.attention import write_kv  # noqa: E402
from distgen.layers.norm import RMSNorm  # noqa: E402
from distgen.layers.rotary import RotaryEmbedding  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device to compile for", allow_module_level=True)
DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)


def _ulp(dtype: torch.dtype) -> dict:
    """Exact in float32; one bfloat16 ulp otherwise (the interpreter truncates float32 -> bfloat16
    casts where CUDA and torch round to nearest even)."""
    return dict(atol=0, rtol=0) if dtype == torch.float32 else dict(atol=1e-6, rtol=2**-7)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 576])
def test_rmsnorm(hidden: int, dtype: torch.dtype) -> None:
    g = _gen(hidden)
    x = torch.randn(5, hidden, generator=g).to(dtype)
    res = torch.randn(5, hidden, generator=g).to(dtype)
    layer = RMSNorm(hidden, eps=1e-5, dtype=dtype)
    layer.weight.data = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype)
    w = layer.weight.data

    ref = rmsnorm_ref(x, w, 1e-5)
    with kernel_mode("torch"):  # the layer's torch path is the reference, bit for bit
        torch.testing.assert_close(ref, layer(x), atol=0, rtol=0)
    out = rmsnorm(x.to(DEVICE), w.to(DEVICE), 1e-5).cpu()
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, **_tol(dtype))

    ref_out, ref_res = fused_add_rmsnorm_ref(x, res, w, 1e-5)
    with kernel_mode("torch"):
        lay_out, lay_res = layer(x, res)
    torch.testing.assert_close(ref_out, lay_out, atol=0, rtol=0)
    torch.testing.assert_close(ref_res, lay_res, atol=0, rtol=0)
    x_before, res_before = x.clone(), res.clone()
    out, new_res = fused_add_rmsnorm(x.to(DEVICE), res.to(DEVICE), w.to(DEVICE), 1e-5)
    assert out.dtype == dtype and new_res.dtype == dtype
    torch.testing.assert_close(new_res.cpu(), ref_res, **_ulp(dtype))  # one rounded add
    torch.testing.assert_close(out.cpu(), ref_out, **_tol(dtype))
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # out of place
    torch.testing.assert_close(res, res_before, atol=0, rtol=0)


def test_rmsnorm_3d_and_strided_rows() -> None:
    g = _gen(7)
    x = torch.randn(2, 3, 2 * 96, generator=g)[..., :96]  # non-contiguous rows
    w = torch.randn(96, generator=g)
    torch.testing.assert_close(rmsnorm(x, w, 1e-6), rmsnorm_ref(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert rmsnorm(x[:0], w, 1e-6).shape == (0, 3, 96)


# ---------------------------------------------------------------- SiLU and mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 1000, 2304])  # one block, a ragged one, several
def test_silu_and_mul(inter: int, dtype: torch.dtype) -> None:
    g = _gen(inter)
    x = (3 * torch.randn(5, 2 * inter, generator=g)).to(dtype)
    ref = silu_and_mul_ref(x)
    assert ref.shape == (5, inter)
    torch.testing.assert_close(SiluAndMul()(x), ref, **_tol(dtype))  # torch path: two roundings in bf16
    x_before = x.clone()
    out = silu_and_mul(x.to(DEVICE)).cpu()
    assert out.dtype == dtype and out.shape == (5, inter)
    torch.testing.assert_close(out, ref, **_tol(dtype))
    torch.testing.assert_close(x, x_before, atol=0, rtol=0)  # out of place


def test_silu_and_mul_3d_strided_and_empty() -> None:
    g = _gen(11)
    x = torch.randn(2, 3, 2 * 2 * 96, generator=g)[..., : 2 * 96]  # non-contiguous rows
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), atol=1e-6, rtol=1e-5)
    assert silu_and_mul(x[:0]).shape == (0, 3, 96)


# ---------------------------------------------------------------- rotary + KV store


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk-norm"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("h", "hkv", "d", "block_size"), [(9, 3, 64, 4), (8, 1, 96, 16), (4, 2, 32, 16)])
def test_rotary_store_kv(
    h: int, hkv: int, d: int, block_size: int, dtype: torch.dtype, qk_norm: bool
) -> None:
    g = _gen(h * 100 + d)
    t, max_pos, num_blocks = 7, 300, 5
    rope = RotaryEmbedding(d, max_pos, base=10000.0)
    positions = torch.tensor([5, 0, 299, 17, 17, 3, 128])  # ragged, unsorted, repeated
    # q/k/v as strided views of a fused QKV buffer, like the model produces.
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=g).to(dtype)
    q = qkv[:, : h * d].view(t, h, d)
    k = qkv[:, h * d : (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]  # distinct, unsorted, block-crossing
    slot_block, slot_offset = slots // block_size, slots % block_size
    base = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(dtype)

    norms, norm_args, dev_norm_args = None, {}, {}
    if qk_norm:  # Qwen3's per-head RMSNorm of q and k, before the rotation
        norms = (RMSNorm(d, eps=1e-5, dtype=dtype), RMSNorm(d, eps=1e-5, dtype=dtype))
        for norm in norms:
            norm.weight.data = (1 + 0.5 * torch.randn(d, generator=g)).to(dtype)
        weights = tuple(n.weight.data for n in norms)
        norm_args = dict(qk_norm=weights, eps=1e-5)
        dev_norm_args = dict(qk_norm=tuple(w.to(DEVICE) for w in weights), eps=1e-5)

    kc_ref, vc_ref = base.clone(), base.clone() * 2
    ref_q = rotary_store_kv_ref(
        q, k, v, positions, rope.cos, rope.sin, kc_ref, vc_ref, slot_block, slot_offset, **norm_args
    )
    # The reference is the torch path: the layers' norms and rotation, then the store.
    lay_q, lay_k = rope(positions, *((norms[0](q), norms[1](k)) if norms else (q, k)))
    kc_lay, vc_lay = base.clone(), base.clone() * 2
    write_kv(kc_lay, vc_lay, lay_k, v, slot_block, slot_offset)
    torch.testing.assert_close(ref_q, lay_q, atol=0, rtol=0)
    torch.testing.assert_close(kc_ref, kc_lay, atol=0, rtol=0)
    torch.testing.assert_close(vc_ref, vc_lay, atol=0, rtol=0)

    qkv_before = qkv.clone()
    kc, vc = base.clone().to(DEVICE), (base.clone() * 2).to(DEVICE)
    dev = [x.to(DEVICE) for x in (q, k, v, positions, rope.cos, rope.sin)]
    out_q = rotary_store_kv(*dev, kc, vc, slot_block.to(DEVICE), slot_offset.to(DEVICE), **dev_norm_args)
    assert out_q.shape == q.shape and out_q.dtype == dtype
    torch.testing.assert_close(out_q.cpu(), ref_q, **_tol(dtype))
    torch.testing.assert_close(kc.cpu(), kc_ref, **_tol(dtype))
    torch.testing.assert_close(vc.cpu(), vc_ref, atol=0, rtol=0)  # values are copied, not rotated
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    untouched = untouched.view(num_blocks, 1, block_size, 1).expand_as(base)
    assert torch.equal(kc.cpu()[untouched], base[untouched])  # only the token slots are written
    torch.testing.assert_close(qkv, qkv_before, atol=0, rtol=0)  # out of place


# ---------------------------------------------------------------- KV store


@pytest.mark.parametrize("cache_dtype", DTYPES)
@pytest.mark.parametrize(("hkv", "d", "block_size"), [(3, 64, 4), (1, 96, 16), (2, 32, 16)])
def test_store_kv(hkv: int, d: int, block_size: int, cache_dtype: torch.dtype) -> None:
    g = _gen(hkv * 1000 + d + block_size)
    t, num_blocks = 9, 6
    k = torch.randn(t, hkv, d, generator=g).to(cache_dtype)
    v = torch.randn(t, hkv, d, generator=g).to(cache_dtype)
    # Distinct slots, in a random (unsorted, block-crossing) order.
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t]
    slot_block, slot_offset = slots // block_size, slots % block_size
    base = torch.randn(num_blocks, hkv, block_size, d, generator=g).to(cache_dtype)

    kc_ref, vc_ref = base.clone(), base.clone() * 2
    store_kv_ref(k, v, kc_ref, vc_ref, slot_block, slot_offset)
    kc_lay, vc_lay = base.clone(), base.clone() * 2
    write_kv(kc_lay, vc_lay, k, v, slot_block, slot_offset)
    torch.testing.assert_close(kc_ref, kc_lay, atol=0, rtol=0)
    torch.testing.assert_close(vc_ref, vc_lay, atol=0, rtol=0)

    kc, vc = base.clone().to(DEVICE), (base.clone() * 2).to(DEVICE)
    store_kv(k.to(DEVICE), v.to(DEVICE), kc, vc, slot_block.to(DEVICE), slot_offset.to(DEVICE))
    torch.testing.assert_close(kc.cpu(), kc_ref, atol=0, rtol=0)  # a copy (plus cast): exact
    torch.testing.assert_close(vc.cpu(), vc_ref, atol=0, rtol=0)


def test_store_kv_into_layer_cache_view() -> None:
    """The runner binds ``kv_cache[0]`` / ``kv_cache[1]`` of one [2, nb, Hkv, bs, D] tensor."""
    g = _gen(3)
    kv = torch.zeros(2, 4, 2, 4, 16)
    k, v = torch.randn(3, 2, 16, generator=g), torch.randn(3, 2, 16, generator=g)
    blk, off = torch.tensor([3, 0, 3]), torch.tensor([1, 2, 0])
    store_kv(k, v, kv[0], kv[1], blk, off)
    ref = torch.zeros_like(kv)
    write_kv(ref[0], ref[1], k, v, blk, off)
    torch.testing.assert_close(kv, ref, atol=0, rtol=0)


def test_store_kv_casts_to_cache_dtype() -> None:
    g = _gen(5)
    k, v = torch.randn(4, 3, 32, generator=g), torch.randn(4, 3, 32, generator=g)
    blk, off = torch.tensor([1, 0, 1, 2]), torch.tensor([3, 3, 0, 1])
    kc, vc = torch.zeros(3, 3, 4, 32, dtype=torch.bfloat16), torch.zeros(3, 3, 4, 32, dtype=torch.bfloat16)
    kr, vr = kc.clone(), vc.clone()
    store_kv(k, v, kc, vc, blk, off)
    write_kv(kr, vr, k, v, blk, off)
    torch.testing.assert_close(kc, kr, **_ulp(torch.bfloat16))
    torch.testing.assert_close(vc, vr, **_ulp(torch.bfloat16))
