"""distgen's CPU GEMM (weights packed once into panels) against a float64 product: every tile shape,
ragged edges, bias, both dtypes, the same answer for a row whatever its batch, the gate/up product with
SiLU-and-mul in its epilogue bit for bit the unfused pair, and the bfloat16 path of CPUs without
AVX-512-BF16 built and checked here too."""

from __future__ import annotations

import ctypes

import pytest
import torch

from distgen.kernels import cpu_build, cpu_gemm, cpu_ops

pytestmark = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler to build the kernels")


def _reference(x, w, b):
    out = x.double() @ w.double().T
    return out if b is None else out + b.double()


def _check(got, x, w, b):
    want = _reference(x, w, b)
    if x.dtype == torch.float32:  # float32 sums of K products, in another order than float64's
        torch.testing.assert_close(got.double(), want, atol=1e-4 * x.shape[-1] ** 0.5, rtol=1e-5)
    else:  # float32 accumulation, one bfloat16 rounding of the result
        torch.testing.assert_close(got.double(), want.to(torch.bfloat16).double(), atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 45, 64, 300])
@pytest.mark.parametrize("n, k", [(1, 1), (16, 8), (17, 33), (48, 64), (100, 577), (960, 576), (33, 1536)])
def test_packed_linear_matches_the_product(dtype, m, n, k):
    torch.manual_seed(m * 1000 + n + k)
    w, x, b = torch.randn(n, k).to(dtype), torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    packed = cpu_gemm.pack(w)
    assert packed is not None and packed.data.numel() == cpu_gemm.packed_numel(n, k, dtype)
    _check(cpu_gemm.linear(x, packed, b), x, w, b)
    _check(cpu_gemm.linear(x, packed, None), x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_its_batch(dtype):
    torch.manual_seed(0)
    w, x = torch.randn(300, 576).to(dtype), torch.randn(64, 576).to(dtype)
    packed = cpu_gemm.pack(w)
    batched = cpu_gemm.linear(x, packed, None)
    for i in (0, 5, 6, 63):
        assert torch.equal(cpu_gemm.linear(x[i : i + 1], packed, None)[0], batched[i])


def test_leading_dims_and_a_wrong_width():
    w = torch.randn(32, 24)
    packed = cpu_gemm.pack(w)
    x = torch.randn(2, 3, 24)
    assert cpu_gemm.linear(x, packed, None).shape == (2, 3, 32)
    with pytest.raises(ValueError, match="input has 25 features, the weight takes 24"):
        cpu_gemm.linear(torch.randn(2, 25), packed, None)
    assert cpu_gemm.pack(torch.randn(4, 4, dtype=torch.float16)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [576, 1536])
def test_a_prefill_sized_batch(dtype, k):
    """Several row blocks (512 rows of k = 576 on AMX, 192 of k = 1536), each thread finishing one work
    item while it computes the next, a ragged last tile: right against float64, and each row as it
    comes out alone or in a small batch."""
    torch.manual_seed(k)
    w, x, b = torch.randn(100, k).to(dtype), torch.randn(1100, k).to(dtype), torch.randn(100).to(dtype)
    packed = cpu_gemm.pack(w)
    got = cpu_gemm.linear(x, packed, b)
    _check(got, x, w, b)
    for i in (0, 511, 512, 1099):
        assert torch.equal(cpu_gemm.linear(x[i : i + 1], packed, b)[0], got[i])
    assert torch.equal(cpu_gemm.linear(x[1090:], packed, b), got[1090:])
    turns = cpu_gemm.pack_gate_up(torch.randn(2 * 48, k).to(dtype))
    fused = cpu_gemm.linear_silu(x, turns)
    assert torch.equal(fused, cpu_ops.silu_and_mul(cpu_gemm.linear(x, turns, None)))
    assert torch.equal(cpu_gemm.linear_silu(x[1099:], turns)[0], fused[1099])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter, k", [(1, 1), (17, 7), (40, 33), (64, 64), (1536, 576)])
def test_the_fused_gate_up_silu_is_the_unfused_pair_bit_for_bit(dtype, inter, k):
    torch.manual_seed(inter + k)
    w = torch.randn(2 * inter, k).to(dtype)
    plain, turns = cpu_gemm.pack(w), cpu_gemm.pack_gate_up(w)
    assert turns is not None and turns.gate_up and not plain.gate_up
    for m in (1, 7, 8, 9, 64, 130):
        x = torch.randn(m, k).to(dtype)
        y = cpu_gemm.linear(x, plain, None)
        # Through the plain GEMM the panels in turns come back in gate-then-up order.
        assert torch.equal(cpu_gemm.linear(x, turns, None), y)
        fused = cpu_gemm.linear_silu(x, turns)
        assert fused.shape == (m, inter)
        assert torch.equal(fused, cpu_ops.silu_and_mul(y)), (m, (fused - cpu_ops.silu_and_mul(y)).abs().max())
    if inter > 1:  # and the unfused pair is right: against torch's silu(gate) * up of a float64 product
        x = torch.randn(5, k).to(dtype)
        want = _reference(x, w, None)
        want = (torch.nn.functional.silu(want[:, :inter]) * want[:, inter:]).to(dtype)
        torch.testing.assert_close(cpu_gemm.linear_silu(x, turns), want, atol=5e-2, rtol=2e-2)


def test_the_gate_up_packing_refuses_what_it_cannot_take():
    turns = cpu_gemm.pack_gate_up(torch.randn(32, 24))
    with pytest.raises(ValueError, match="without a bias"):
        cpu_gemm.linear(torch.randn(2, 24), turns, torch.randn(32))
    with pytest.raises(ValueError, match="packed by pack_gate_up"):
        cpu_gemm.linear_silu(torch.randn(2, 24), cpu_gemm.pack(torch.randn(32, 24)))
    with pytest.raises(ValueError, match="input has 25 features"):
        cpu_gemm.linear_silu(torch.randn(2, 25), turns)
    assert cpu_gemm.pack_gate_up(torch.randn(33, 24)) is None  # no even split into gate and up


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler here")
def test_the_bfloat16_path_without_avx512_bf16(tmp_path):
    """A CPU without vdpbf16ps runs each pair as two float32 FMAs; built here with the instruction off."""
    out = tmp_path / "no_bf16.so"
    # The GEMM's own source only: the rest of the library does not change the path under test. Without
    # AMX either (an AMX CPU would take its tiles for K a multiple of 32).
    flags = ("-mno-avx512bf16", "-mno-amx-tile")
    cpu_build.build(cpu_build.compiler(), out, flags, [cpu_build.SOURCE_DIR / "gemm.cpp"])
    assert not ctypes.CDLL(str(out)).dg_linear_bf16_amx()
    fn = ctypes.CDLL(str(out)).dg_linear_bf16
    fn.argtypes, fn.restype = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3, None
    torch.manual_seed(1)
    for m, n, k in [(1, 40, 33), (7, 960, 576), (13, 17, 5)]:
        w, x, b = (torch.randn(*s).to(torch.bfloat16) for s in ((n, k), (m, k), (n,)))
        packed = cpu_gemm.pack(w)
        got = torch.empty(m, n, dtype=torch.bfloat16)
        fn(got.data_ptr(), x.data_ptr(), packed.data.data_ptr(), b.data_ptr(), m, n, k)
        _check(got, x, w, b)
        torch.testing.assert_close(got, cpu_ops_linear(x, packed, b), atol=2e-2, rtol=1e-2)
    silu = ctypes.CDLL(str(out)).dg_linear_silu_bf16  # the fused epilogue on the same path
    silu.argtypes, silu.restype = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3, None
    for m, inter, k in [(1, 20, 33), (9, 48, 64)]:
        w, x = torch.randn(2 * inter, k).to(torch.bfloat16), torch.randn(m, k).to(torch.bfloat16)
        plain, turns = cpu_gemm.pack(w), cpu_gemm.pack_gate_up(w)
        unfused = torch.empty(m, 2 * inter, dtype=torch.bfloat16)
        fn(unfused.data_ptr(), x.data_ptr(), plain.data.data_ptr(), None, m, 2 * inter, k)
        got = torch.empty(m, inter, dtype=torch.bfloat16)
        silu(got.data_ptr(), x.data_ptr(), turns.data.data_ptr(), m, inter, k)
        assert torch.equal(got, cpu_ops.silu_and_mul(unfused))


@pytest.mark.skipif(cpu_build.compiler() is None, reason="no C++ compiler here")
@pytest.mark.skipif(not cpu_ops.linear_bf16_on_amx(), reason="this CPU has no AMX (or Linux withholds it)")
def test_amx_tiles_and_vdpbf16ps_give_the_same_products(tmp_path):
    """On an AMX CPU the bfloat16 GEMM takes AMX tiles; the vdpbf16ps build of the same weights agrees
    (float32 sums of the same exact products in another order, one bf16 rounding)."""
    out = tmp_path / "no_amx.so"
    cpu_build.build(cpu_build.compiler(), out, ("-mno-amx-tile",), [cpu_build.SOURCE_DIR / "gemm.cpp"])
    fn = ctypes.CDLL(str(out)).dg_linear_bf16
    fn.argtypes, fn.restype = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3, None
    torch.manual_seed(2)
    for m, n, k in [(1, 48, 64), (17, 100, 576), (300, 64, 1536)]:
        w, x = torch.randn(n, k).to(torch.bfloat16), torch.randn(m, k).to(torch.bfloat16)
        packed = cpu_gemm.pack(w)
        want = torch.empty(m, n, dtype=torch.bfloat16)
        fn(want.data_ptr(), x.data_ptr(), packed.data.data_ptr(), None, m, n, k)
        got = cpu_gemm.linear(x, packed, None)
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=1.6e-2)
        assert (got != want).float().mean() < 0.1  # mostly the same rounding


def cpu_ops_linear(x, packed, b):
    out = x.new_empty(x.shape[0], packed.out_features)
    cpu_ops.linear(out, x, packed.data, b)
    return out
