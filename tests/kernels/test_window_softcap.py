"""Sliding windows and logit soft-capping in every attention kernel: the CPU kernel (tiled and general
paths) and the Triton decode and prefill kernels (in the interpreter on a CPU-only machine) against
the torch references, and the references against a dense computation written from the definitions."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from distgen.kernels import cpu_build, cpu_ops  # noqa: E402
from distgen.kernels.paged_attention import (  # noqa: E402
    paged_attention_decode,
    paged_attention_decode_ref,
)
from distgen.kernels.paged_prefill import paged_attention_prefill, paged_attention_prefill_ref  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def paged(rows, h, hkv, d, bs, dtype=torch.float32, seed=0):
    """Random caches of scattered blocks (garbage, even NaN, in unused slots) and packed queries for
    rows of (queries, context): (q, k_cache, v_cache, tables, lens, starts, dense K/V per row)."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-ctx // bs) for _, ctx in rows)
    num_blocks = len(rows) * max_blocks + 3
    k_cache = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dtype)
    v_cache = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
    dense = []
    for i, (_, ctx) in enumerate(rows):
        nb = -(-ctx // bs)
        tables[i, :nb] = perm[i * max_blocks : i * max_blocks + nb].int()
        k = torch.randn(ctx, hkv, d, generator=g).to(dtype)
        v = torch.randn(ctx, hkv, d, generator=g).to(dtype)
        for t in range(ctx):
            k_cache[tables[i, t // bs], :, t % bs] = k[t]
            v_cache[tables[i, t // bs], :, t % bs] = v[t]
        dense.append((k, v))
    lens = torch.tensor([ctx for _, ctx in rows], dtype=torch.int32)
    starts = torch.tensor([0] + [n for n, _ in rows], dtype=torch.int32).cumsum(0).int()
    q = (3 * torch.randn(int(starts[-1]), h, d, generator=g)).to(dtype)  # large scores: the cap bites
    return q, k_cache, v_cache, tables, lens, starts, dense


def dense_attention(q, starts, dense, scale, window, softcap):
    """From the definitions: query i of n in a context of ctx sits at ctx - n + i and sees the keys
    j with pos - window < j <= pos; scores soft-capped, then softmax."""
    outs = []
    for i, (k, v) in enumerate(dense):
        qi = q[int(starts[i]) : int(starts[i + 1])].double()
        n, ctx, group = qi.shape[0], k.shape[0], q.shape[1] // k.shape[1]
        kk = k.double().repeat_interleave(group, 1)
        vv = v.double().repeat_interleave(group, 1)
        s = torch.einsum("qhd,khd->hqk", qi, kk) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(n)[:, None] + ctx - n
        j = torch.arange(ctx)[None, :]
        ok = (j <= pos) & (j > pos - window if window else True)
        p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1)
        outs.append(torch.einsum("hqk,khd->qhd", p, vv))
    return torch.cat(outs).float()


ROWS = [(1, 1), (1, 17), (1, 70), (5, 5), (40, 90), (3, 40), (1, 33)]
CASES = [(None, None), (16, None), (None, 2.0), (7, 3.0), (1, None), (200, 1.5)]


@pytest.mark.parametrize("window,softcap", CASES)
def test_references_follow_the_definitions(window, softcap):
    q, kc, vc, tables, lens, starts, dense = paged(ROWS, 6, 2, 16, 8)
    want = dense_attention(q, starts, dense, 0.3, window, softcap)
    got = paged_attention_prefill_ref(q, kc, vc, tables, starts, lens, 0.3, window, softcap)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    decodes = [i for i, (n, _) in enumerate(ROWS) if n == 1]
    dq = q[starts[decodes].long()]
    got = paged_attention_decode_ref(dq, kc, vc, tables[decodes], lens[decodes], 0.3, window, softcap)
    torch.testing.assert_close(got, want[starts[decodes].long()], atol=1e-5, rtol=1e-5)


def test_softcap_and_window_change_the_result():
    q, kc, vc, tables, lens, starts, _ = paged(ROWS, 6, 2, 16, 8)
    plain = paged_attention_prefill_ref(q, kc, vc, tables, starts, lens, 0.3)
    for window, softcap in [(16, None), (None, 2.0)]:
        other = paged_attention_prefill_ref(q, kc, vc, tables, starts, lens, 0.3, window, softcap)
        assert (other - plain).abs().max() > 1e-2, (window, softcap)


needs_cpu = pytest.mark.skipif(cpu_build.try_load() is None, reason="the CPU kernels do not build here")


@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [
        (9, 3, 64, 16),  # the tiled path: spans of four blocks
        (8, 2, 128, 32),  # the tiled path: spans of two blocks
        (8, 2, 256, 16),  # the tiled path at Gemma's head size
        (4, 4, 32, 5),  # the general path
        (8, 1, 16, 1),
    ],
)
@pytest.mark.parametrize("window,softcap", CASES)
def test_cpu_kernel_window_and_softcap(dtype, shape, window, softcap):
    h, hkv, d, bs = shape
    q, kc, vc, tables, lens, starts, _ = paged(ROWS, h, hkv, d, bs, dtype, seed=1)
    kt = kc.transpose(-1, -2).contiguous()
    got = cpu_ops.paged_attention(q, kt, vc, tables, lens, starts, d**-0.5, window=window, softcap=softcap)
    want = paged_attention_prefill_ref(q, kc, vc, tables, starts, lens, d**-0.5, window, softcap)
    assert not got.isnan().any()
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window,softcap", [(16, None), (5, 2.0), (None, 2.0)])
def test_triton_decode_window_and_softcap(splits, window, softcap):
    pytest.importorskip("triton")
    rows = [(1, 1), (1, 17), (1, 70), (1, 33)]
    q, kc, vc, tables, lens, _, _ = paged(rows, 4, 2, 16, 8, seed=2)
    q, kc, vc = q, kc.nan_to_num(), vc.nan_to_num()  # masked loads read 0 where NaN would be kept
    args = (q, kc, vc, tables, lens)
    out = paged_attention_decode(
        *(t.to(DEVICE) for t in args), 0.25, num_splits=splits, window=window, softcap=softcap
    )
    want = paged_attention_decode_ref(*args, 0.25, window, softcap)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,softcap", [(6, None), (11, 2.0)])
def test_triton_prefill_window_and_softcap(window, softcap):
    pytest.importorskip("triton")
    rows = [(1, 1), (20, 20), (7, 30), (3, 9)]
    q, kc, vc, tables, lens, starts, _ = paged(rows, 4, 2, 16, 4, seed=3)
    kc, vc = kc.nan_to_num(), vc.nan_to_num()
    args = (q, kc, vc, tables, starts, lens)
    out = paged_attention_prefill(
        *(t.to(DEVICE) for t in args), 0.25, max(n for n, _ in rows), window=window, softcap=softcap
    )
    want = paged_attention_prefill_ref(*args, 0.25, window, softcap)
    torch.testing.assert_close(out.cpu(), want, atol=1e-5, rtol=1e-5)
