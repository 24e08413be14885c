"""The quantized GEMM (weights kept in their block format, dequantized inside the product) against
its torch reference: the C++ kernel for every format and both activation dtypes, odd row counts, K
that is not a multiple of the tile, tensor-parallel shards; the GGUF block split against the file
reader's dequantization; and the Triton kernel in the interpreter (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from distgen.kernels import cpu_build, cpu_ops, quant  # noqa: E402
from distgen.kernels.dispatch import kernel_mode  # noqa: E402
from distgen.kernels.quant import FORMATS, QuantizedWeight, dequantize, quant_linear  # noqa: E402
from distgen.kernels.reference import quant_linear_int8_ref, quant_linear_ref  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

needs_cpu_kernels = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_weight(fmt: str, n: int, k: int, seed: int = 0) -> QuantizedWeight:
    """Random codes over their whole range, and scales/minimums of a real checkpoint's size."""
    g = torch.Generator().manual_seed(seed)
    qw = QuantizedWeight.empty(fmt, n, k)
    hi = 256 if fmt.startswith("q4") else 128
    lo = 0 if fmt.startswith("q4") else -127
    qw.codes.copy_(torch.randint(lo, hi, qw.codes.shape, generator=g).to(qw.codes.dtype))
    if fmt == "int8":
        qw.codes[:, k:] = 0  # the padding of a partial last block
    qw.scales.copy_((torch.rand(qw.scales.shape, generator=g) * 0.02 + 1e-3).to(qw.scales.dtype))
    if qw.mins is not None:
        qw.mins.copy_((-torch.rand(qw.mins.shape, generator=g) * 0.1).to(qw.mins.dtype))
    return qw


def _check(got: torch.Tensor, x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None) -> None:
    want = x.double() @ dequantize(qw).double().T
    if bias is not None:
        want = want + bias.double()
    scale = float(want.abs().max()) + 1.0
    if x.dtype == torch.float32:  # float32 sums of K products, in another order than float64's
        torch.testing.assert_close(got.double(), want, atol=2e-6 * scale * qw.in_features**0.5, rtol=1e-5)
    else:  # float32 accumulation, one bfloat16 rounding of the result
        torch.testing.assert_close(
            got.double(), want.to(torch.bfloat16).double(), atol=1e-2 * scale, rtol=1e-2
        )
    ref = quant_linear_ref(x, qw, bias)
    assert ref.dtype == x.dtype and ref.shape == got.shape


@needs_cpu_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 13])
@pytest.mark.parametrize("n, k", [(1, 32), (45, 576), (7, 50), (16, 577)])
def test_cpu_kernel_matches_the_reference(fmt, dtype, m, n, k):
    if fmt != "int8" and k % quant.BLOCK:
        pytest.skip("GGUF block formats hold whole blocks of 32 inputs")
    qw = random_weight(fmt, n, k, seed=m + n + k)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    _check(quant_linear(x, qw, b), x, qw, b)
    _check(quant_linear(x, qw, None), x, qw, None)


needs_vnni = pytest.mark.skipif(
    cpu_build.try_load() is None or not cpu_ops.int8_activations_available(), reason="no AVX-512 VNNI build"
)


@needs_vnni
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m, n, k", [(1, 5, 64), (5, 33, 576), (13, 7, 608), (3, 9, 50), (4, 16, 577)])
def test_int8_activation_kernel_matches_its_reference(fmt, dtype, m, n, k):
    """The VNNI kernel against the product of the int8-quantized activations and the dequantized
    weights: equal up to float32 rounding (19 blocks: a pair with one real block; int8: K tails)."""
    if fmt != "int8" and k % quant.BLOCK:
        pytest.skip("GGUF block formats hold whole blocks of 32 inputs")
    qw = random_weight(fmt, n, k, seed=m + n + k)
    x, b = torch.randn(m, k).to(dtype), torch.randn(n).to(dtype)
    got, want = quant_linear(x, qw, b, int8_activations=True), quant_linear_int8_ref(x, qw, b)
    scale = float(want.float().abs().max()) + 1.0
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-6 * scale * k**0.5, rtol=1e-5)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=1e-2 * scale, rtol=1e-2)


@needs_cpu_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("int8", [False, True])
def test_a_rows_result_does_not_depend_on_its_batch(fmt, int8):
    if int8 and not cpu_ops.int8_activations_available():
        pytest.skip("no AVX-512 VNNI build")
    qw, x = random_weight(fmt, 70, 192), torch.randn(11, 192)
    batched = quant_linear(x, qw, None, int8)
    for i in (0, 3, 4, 10):
        assert torch.equal(quant_linear(x[i : i + 1], qw, None, int8)[0], batched[i])


def test_torch_fallback_is_the_reference():
    qw, x = random_weight("q4_1", 9, 64), torch.randn(3, 64)
    with kernel_mode("torch"):
        assert torch.equal(quant_linear(x, qw, None), quant_linear_ref(x, qw, None))
        assert torch.equal(quant_linear(x, qw, None, True), quant_linear_int8_ref(x, qw, None))


@needs_cpu_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_parallel_shards(fmt):
    """Column shards cut rows; row shards cut columns between blocks and sum to the whole product."""
    qw, x = random_weight(fmt, 40, 192), torch.randn(5, 192)
    whole = quant_linear(x, qw, None).double()
    cols = [quant_linear(x, qw.narrow(0, s, n), None) for s, n in ((0, 21), (21, 19))]
    torch.testing.assert_close(torch.cat(cols, dim=-1).double(), whole, atol=1e-5, rtol=1e-5)
    parts = []
    for s, n in ((0, 96), (96, 64), (160, 32)):
        shard = qw.narrow(1, s, n)
        shard = QuantizedWeight(
            shard.fmt,
            *[t.contiguous() if t is not None else None for t in (shard.codes, shard.scales, shard.mins)],
            shard.out_features,
            shard.in_features,
        )
        torch.testing.assert_close(dequantize(shard), dequantize(qw)[:, s : s + n])
        parts.append(quant_linear(x[:, s : s + n].contiguous(), shard, None).double())
    torch.testing.assert_close(sum(parts), whole, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_a_shard_that_cuts_a_block_is_refused(fmt):
    with pytest.raises(ValueError, match="cuts a block"):
        random_weight(fmt, 8, 96).narrow(1, 0, 48)
    assert random_weight("int8", 8, 96).narrow(1, 0, 48).in_features == 48  # per-row scales: any cut


def test_gguf_blocks_split_without_changing_a_bit():
    """The default model's Q4_1 and Q8_0 tensors, split into codes and scales, dequantize to what the
    GGUF reader's own dequantization gives."""
    from distgen.model_loader.gguf import default_model_path
    from distgen.model_loader.gguf_file import GGUFFile
    from distgen.model_loader.gguf_file import dequantize as gguf_dequantize

    try:
        path = default_model_path()
    except RuntimeError as e:
        pytest.skip(str(e))
    tensors = {t.name: t for t in GGUFFile(path).tensors}
    for name, fmt in (("blk.0.ffn_down.weight", "q4_1"), ("token_embd.weight", "q8_0")):
        t = tensors[name]
        qw = quant.from_ggml_blocks(fmt, t.data[:64], (64, t.shape[1]))
        assert torch.equal(dequantize(qw), gguf_dequantize(t)[:64])
        assert qw.nbytes() == t.data[:64].nbytes  # the same bits per weight as the file


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m, n, k", [(1, 33, 64), (5, 40, 96)])
def test_triton_kernel_matches_the_reference(fmt, m, n, k):
    from distgen.kernels.quant_gemm import quant_linear_triton

    if fmt == "int8":
        k += 7  # a partial last block
    qw = random_weight(fmt, n, k, seed=m * n)
    qw = QuantizedWeight(
        qw.fmt, *(t.to(DEVICE) if t is not None else None for t in (qw.codes, qw.scales, qw.mins)), n, k
    )
    x, b = torch.randn(m, k, device=DEVICE), torch.randn(n, device=DEVICE)
    got = quant_linear_triton(x, qw, b)
    torch.testing.assert_close(got, quant_linear_ref(x, qw, b), atol=1e-3, rtol=1e-4)
