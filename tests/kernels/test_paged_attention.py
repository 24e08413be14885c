"""Paged-attention decode kernel against its torch reference, and the reference against dense SDPA.

Runs the Triton kernel in the interpreter on CPU-only machines (``TRITON_INTERPRET=1``, set before
triton is imported); shapes are kept small because the interpreter is slow.
"""

from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distgen.kernels.paged_attention import (  # noqa: E402
    num_splits_for,
    paged_attention_decode,
    paged_attention_decode_ref,
)
from distgen.layers.attention import ContextRead, read_context, tile_index  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(
    seq_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    int64_table: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, caches and a block table of non-contiguous, shuffled block ids (padding left as garbage)."""
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    need = [(n + block_size - 1) // block_size for n in seq_lens]
    max_blocks = max(need) + 1  # one spare column so tables are wider than any sequence needs
    num_blocks = 2 * sum(need) + 3
    perm = torch.randperm(num_blocks, generator=g)
    table = torch.full((b, max_blocks), num_blocks - 1, dtype=torch.int64)  # padding: a real block id
    pos = 0
    for i, nb in enumerate(need):
        table[i, :nb] = perm[pos : pos + nb]
        pos += nb
    table = table.to(torch.int64 if int64_table else torch.int32)
    q = torch.randn(b, num_heads, head_dim, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, num_kv_heads, block_size, head_dim, generator=g).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return q, k_cache, v_cache, table, lens


def dense_sdpa(q, k_cache, v_cache, table, lens, scale) -> torch.Tensor:
    """distgen's CPU decode path: read_context gathers the tiles, SDPA with the group in the q-length dim."""
    b, h, d = q.shape
    _, hkv, bs, _ = k_cache.shape
    out = torch.empty(b, h, d, dtype=torch.float32)
    for i in range(b):
        n = int(lens[i])
        nb = (n + bs - 1) // bs
        ctx = ContextRead(
            tile_index=tile_index(table[i : i + 1, :nb].long(), hkv),
            num_seqs=1,
            length=nb * bs,
            mask=(torch.arange(nb * bs) < n).view(1, 1, 1, -1),
        )
        k = read_context(k_cache.float(), ctx, None)  # [1, Hkv, L, D]
        v = read_context(v_cache.float(), ctx, None)
        qg = q[i : i + 1].float().view(1, hkv, h // hkv, d)
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=ctx.mask, scale=scale)
        out[i] = o.view(h, d)
    return out


# (H, Hkv): GQA ratios 1, 3 and 8.
HEADS = [(4, 4), (9, 3), (8, 1)]


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_dense_sdpa(heads, block_size):
    h, hkv = heads
    lens = [1, block_size, 3 * block_size + 2, 2 * block_size - 1]
    q, kc, vc, table, sl = make_inputs(lens, h, hkv, 32, block_size, torch.float32, seed=1)
    scale = 32**-0.5
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, scale)
    torch.testing.assert_close(ref, dense_sdpa(q, kc, vc, table, sl, scale), atol=1e-5, rtol=1e-5)


def test_reference_ignores_tokens_past_seq_len():
    q, kc, vc, table, sl = make_inputs([5, 9], 4, 2, 32, 4, torch.float32, seed=2)
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, 0.2)
    # Scribble over the unused tail of each last block and over the spare table column's block.
    kc2, vc2 = kc.clone(), vc.clone()
    for i, n in enumerate(sl.tolist()):
        last = int(table[i, (n - 1) // 4])
        kc2[last, :, n % 4 or 4 :] = 1e4
        vc2[last, :, n % 4 or 4 :] = 1e4
    torch.testing.assert_close(paged_attention_decode_ref(q, kc2, vc2, table, sl, 0.2), ref)


@needs_triton
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_float32(heads, block_size):
    h, hkv = heads
    lens = [1, block_size, 3 * block_size + 2]
    q, kc, vc, table, sl = make_inputs(lens, h, hkv, 32, block_size, torch.float32, seed=3)
    scale = 32**-0.5
    args = [t.to(DEVICE) for t in (q, kc, vc, table, sl)]
    out = paged_attention_decode(*args, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, scale)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    # And the unpadded scores: tokens past seq_len must not leak in.
    torch.testing.assert_close(out.cpu(), dense_sdpa(q, kc, vc, table, sl, scale), atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("heads", [(9, 3), (8, 1)])
def test_kernel_bfloat16(heads):
    h, hkv = heads
    lens = [1, 8, 19]
    q, kc, vc, table, sl = make_inputs(lens, h, hkv, 64, 8, torch.bfloat16, seed=4, int64_table=True)
    scale = 64**-0.5
    args = [t.to(DEVICE) for t in (q, kc, vc, table, sl)]
    out = paged_attention_decode(*args, scale)
    assert out.dtype == torch.bfloat16
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, scale)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)


@needs_triton
def test_kernel_head_dim_128_and_noncontiguous_q():
    lens = [7, 16]
    q, kc, vc, table, sl = make_inputs(lens, 4, 2, 128, 16, torch.float32, seed=5)
    qt = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous strides
    assert not qt.is_contiguous()
    args = [t.to(DEVICE) for t in (qt, kc, vc, table, sl)]
    out = paged_attention_decode(*args, 0.1)
    torch.testing.assert_close(
        out.cpu(), paged_attention_decode_ref(q, kc, vc, table, sl, 0.1), atol=1e-5, rtol=1e-5
    )


@needs_triton
def test_kernel_odd_block_size_and_head_dim_into_out_slice():
    """Block size 6 and head dim 48 (not powers of two), int64 lengths, written into a slice of a
    larger buffer whose other rows stay untouched."""
    lens = [1, 6, 13, 20]
    q, kc, vc, table, sl = make_inputs(lens, 6, 2, 48, 6, torch.float32, seed=6)
    args = [t.to(DEVICE) for t in (q, kc, vc, table, sl.long())]
    buf = torch.full((len(lens) + 2, 6, 48), float("nan"), device=DEVICE)
    res = paged_attention_decode(*args, 0.15, out=buf[1:-1])
    assert res.data_ptr() == buf[1:-1].data_ptr()
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, 0.15)
    torch.testing.assert_close(buf[1:-1].cpu(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[-1]).all()


def test_num_splits_for_small_batches_only():
    assert num_splits_for(1, 8) == 16 and num_splits_for(4, 8) == 4 and num_splits_for(2, 1) == 16
    assert num_splits_for(16, 8) == 1 and num_splits_for(256, 8) == 1 and num_splits_for(3, 32) == 2


@needs_triton
@pytest.mark.parametrize("splits", [1, 2, 4, 16])
def test_kernel_context_splits(splits):
    """Contexts split in 1..16 contiguous ranges (some empty: 1 or 2 blocks over 16 splits), combined."""
    lens = [1, 5, 37, 64]
    q, kc, vc, table, sl = make_inputs(lens, 9, 3, 32, 4, torch.float32, seed=7)
    args = [t.to(DEVICE) for t in (q, kc, vc, table, sl)]
    out = paged_attention_decode(*args, 0.2, num_splits=splits)
    ref = paged_attention_decode_ref(q, kc, vc, table, sl, 0.2)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
