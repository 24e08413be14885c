"""Paged-attention prefill / chunked-prefill kernel against its torch reference, and the reference
against dense causal SDPA on K/V laid into the paged cache.

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

from distgen.kernels.paged_attention import paged_attention_decode_ref  # noqa: E402
from distgen.kernels.paged_prefill import (  # noqa: E402
    paged_attention_prefill,
    paged_attention_prefill_ref,
)

triton = pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET is off and there is no CUDA device to compile for", allow_module_level=True)

# (H, Hkv): GQA ratios 1, 3 and 8.
HEADS = [(4, 4), (9, 3), (8, 1)]
# (cached prefix, chunk length) per sequence: fresh prompts of ragged lengths, chunks after a cached
# prefix (a block boundary or not), and a one-token chunk.
RAGGED = [(0, 1), (0, 5), (0, 37), (13, 7), (32, 1), (3, 20)]


class Batch:
    """Random dense K/V of every sequence laid into a paged cache of shuffled blocks, plus packed q."""

    def __init__(self, specs, h, hkv, d, bs, dtype, seed, int64=False):
        g = torch.Generator().manual_seed(seed)
        lens = [c + n for c, n in specs]
        need = [(n + bs - 1) // bs for n in lens]
        num_blocks = 2 * sum(need) + 3
        perm = torch.randperm(num_blocks, generator=g)
        itype = torch.int64 if int64 else torch.int32
        self.table = torch.full((len(specs), max(need) + 1), num_blocks - 1, dtype=itype)
        # Garbage everywhere first: slots past a sequence's end must never be read.
        self.k_cache = (100 * torch.randn(num_blocks, hkv, bs, d, generator=g)).to(dtype)
        self.v_cache = (100 * torch.randn(num_blocks, hkv, bs, d, generator=g)).to(dtype)
        self.k, self.v = [], []
        pos = 0
        for i, (n, nb) in enumerate(zip(lens, need)):
            self.table[i, :nb] = perm[pos : pos + nb].to(itype)
            pos += nb
            k = torch.randn(n, hkv, d, generator=g).to(dtype)
            v = torch.randn(n, hkv, d, generator=g).to(dtype)
            for t in range(n):
                blk = int(self.table[i, t // bs])
                self.k_cache[blk, :, t % bs] = k[t]
                self.v_cache[blk, :, t % bs] = v[t]
            self.k.append(k)
            self.v.append(v)
        self.q_lens = [n for _, n in specs]
        self.query_start = torch.tensor([0] + list(torch.tensor(self.q_lens).cumsum(0)), dtype=itype)
        self.seq_lens = torch.tensor(lens, dtype=itype)
        self.q = torch.randn(sum(self.q_lens), h, d, generator=g).to(dtype)
        self.max_q = max(self.q_lens)

    def args(self, device: str = "cpu"):
        ts = (self.q, self.k_cache, self.v_cache, self.table, self.query_start, self.seq_lens)
        return [t.to(device) for t in ts]


def dense_causal(batch: Batch, scale: float) -> torch.Tensor:
    """Float32 SDPA per sequence on its dense K/V, with the causal mask shifted by the cached prefix."""
    outs = []
    for i, n_q in enumerate(batch.q_lens):
        lo = int(batch.query_start[i])
        q = batch.q[lo : lo + n_q].float().transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        k = batch.k[i].float().transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
        v = batch.v[i].float().transpose(0, 1).unsqueeze(0)
        n = k.shape[2]
        if n == n_q:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = torch.arange(n)[None, :] <= torch.arange(n_q)[:, None] + (n - n_q)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_dense_causal_sdpa(heads, block_size):
    h, hkv = heads
    b = Batch(RAGGED, h, hkv, 32, block_size, torch.float32, seed=1)
    scale = 32**-0.5
    ref = paged_attention_prefill_ref(*b.args(), scale)
    torch.testing.assert_close(ref, dense_causal(b, scale), atol=1e-5, rtol=1e-5)


def test_reference_one_token_chunks_equal_decode_reference():
    specs = [(0, 1), (6, 1), (17, 1)]
    b = Batch(specs, 8, 2, 32, 4, torch.float32, seed=2)
    q, kc, vc, table, _, lens = b.args()
    dec = paged_attention_decode_ref(q, kc, vc, table, lens, 0.2)
    torch.testing.assert_close(paged_attention_prefill_ref(*b.args(), 0.2), dec, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("block_size", [4, 16])
def test_kernel_float32(heads, block_size):
    h, hkv = heads
    b = Batch(RAGGED, h, hkv, 32, block_size, torch.float32, seed=3)
    scale = 32**-0.5
    out = paged_attention_prefill(*b.args(DEVICE), scale, b.max_q)
    assert out.shape == b.q.shape and out.dtype == torch.float32
    ref = paged_attention_prefill_ref(*b.args(), scale)
    torch.testing.assert_close(out.cpu(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.cpu(), dense_causal(b, scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("heads", [(9, 3), (8, 1)])
def test_kernel_bfloat16(heads):
    h, hkv = heads
    b = Batch([(0, 19), (8, 8), (40, 3)], h, hkv, 64, 16, torch.bfloat16, seed=4, int64=True)
    scale = 64**-0.5
    out = paged_attention_prefill(*b.args(DEVICE), scale, b.max_q)
    assert out.dtype == torch.bfloat16
    ref = paged_attention_prefill_ref(*b.args(), scale)
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_kernel_long_chunk_many_query_tiles():
    """A chunk longer than one query tile, after a prefix longer than one key tile."""
    b = Batch([(70, 45), (0, 66)], 4, 2, 16, 8, torch.float32, seed=5)
    out = paged_attention_prefill(*b.args(DEVICE), 0.25, b.max_q)
    torch.testing.assert_close(out.cpu(), paged_attention_prefill_ref(*b.args(), 0.25), atol=1e-5, rtol=1e-5)


def test_kernel_odd_block_size_and_head_dim_strided_q_into_out_slice():
    """Block size 6 and head dim 48 (not powers of two); q a strided view (as split from a fused QKV);
    the result written into a slice of a larger buffer, whose other rows stay untouched."""
    b = Batch([(5, 4), (0, 9), (12, 2)], 6, 2, 48, 6, torch.float32, seed=6)
    q, kc, vc, table, qs, lens = b.args(DEVICE)
    wide = torch.randn(q.shape[0], q.shape[1], 3 * q.shape[2]).to(DEVICE)
    wide[..., :48] = q
    q_view = wide[..., :48]
    assert not q_view.is_contiguous()
    buf = torch.full((q.shape[0] + 3, *q.shape[1:]), float("nan"), device=DEVICE)
    res = paged_attention_prefill(q_view, kc, vc, table, qs, lens, 0.15, b.max_q, out=buf[2:-1])
    assert res.data_ptr() == buf[2:-1].data_ptr()
    ref = paged_attention_prefill_ref(*b.args(), 0.15)
    torch.testing.assert_close(buf[2:-1].cpu(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isnan(buf[:2]).all() and torch.isnan(buf[-1:]).all()
