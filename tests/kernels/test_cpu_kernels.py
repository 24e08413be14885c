"""The CPU kernels against their plain-torch references (the layers' torch path), float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from distgen.kernels import cpu_build, cpu_ops, dispatch
from distgen.kernels.paged_prefill import paged_attention_prefill_ref
from distgen.layers.activation import SiluAndMul
from distgen.layers.attention import write_kv
from distgen.layers.norm import RMSNorm
from distgen.layers.rotary import RotaryEmbedding

pytestmark = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler to build the kernels")

DTYPES = [torch.float32, torch.bfloat16]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, atol: float = 1e-5) -> None:
    if dtype == torch.float32:
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)
    else:  # one bf16 rounding step apart at most
        torch.testing.assert_close(a.float(), b.float(), atol=1e-2, rtol=1.6e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("hidden", [576, 100])  # sixteen lanes at a time, and the general loop
def test_rms_norm_and_fused_add(dtype, rows, hidden):
    torch.manual_seed(rows)
    norm = RMSNorm(hidden, 1e-5, dtype)
    norm.weight.data = torch.randn(hidden).to(dtype)
    x, res = torch.randn(rows, hidden).to(dtype), torch.randn(rows, hidden).to(dtype)
    # Sums that round in every way: ties to even, halfway up, NaN, infinities, float32 subnormals.
    x[0, :8] = torch.tensor([1.0, 1.0, float("nan"), float("inf"), -float("inf"), 3e-39, 1e-38, 65504.0])
    res[0, :8] = torch.tensor([2**-8, 3 * 2**-8, 1.0, 1.0, 2.0, 1e-39, -3e-39, 1.0])
    with dispatch.kernel_mode("torch"):  # the layer's reference path, not the kernel under test
        want = norm(x)
        want_x, want_res = norm(x, res)
    _close(cpu_ops.rms_norm(x[1:], norm.weight, norm.eps), want[1:], dtype)
    got_x, got_res = cpu_ops.fused_add_rms_norm(x.clone(), res.clone(), norm.weight, norm.eps)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(got_res.view(bits), want_res.view(bits))  # the add rounds exactly as torch's
    assert got_x[0].isnan().all() and want_x[0].isnan().all()  # the row that met a NaN
    _close(got_x[1:], want_x[1:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = (torch.randn(33, 2 * 1536) * 4).to(dtype)
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    with dispatch.kernel_mode("torch"):
        want = SiluAndMul()(x)
    _close(cpu_ops.silu_and_mul(x), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [False, True])
def test_rotary_store_kv(dtype, qk_norm):
    torch.manual_seed(0)
    t, h, hkv, d, bs, blocks = 11, 6, 2, 64, 4, 9
    rotary = RotaryEmbedding(d, 128, 10000.0)
    qkv = torch.randn(t, (h + 2 * hkv) * d).to(dtype)  # q/k/v are strided views, as in the model
    q, k, v = (x.view(t, -1, d) for x in qkv.split([h * d, hkv * d, hkv * d], dim=-1))
    positions = torch.randint(0, 128, (t,))
    slot_block, slot_offset = torch.arange(t) % blocks, torch.randint(0, bs, (t,))
    norms = None
    if qk_norm:
        norms = (RMSNorm(d, 1e-6, dtype), RMSNorm(d, 1e-6, dtype))
        for n in norms:
            n.weight.data = torch.randn(d).to(dtype)
    with dispatch.kernel_mode("torch"):
        q_in, k_in = (norms[0](q), norms[1](k)) if norms else (q, k)
    want_q, want_k = rotary(positions, q_in, k_in)
    want_cache = torch.zeros(2, blocks, hkv, bs, d, dtype=dtype)
    write_kv(want_cache[0], want_cache[1], want_k, v, slot_block, slot_offset)

    cache = torch.zeros_like(want_cache)
    weights = None if norms is None else (norms[0].weight, norms[1].weight)
    cpu_ops.rotary_store_kv(
        q, k, v, cache[0], cache[1], slot_block, slot_offset, positions, rotary.cos, rotary.sin, weights, 1e-6
    )
    _close(q, want_q, dtype)
    _close(cpu_ops.k_cache_view(cache[0]), want_cache[0].transpose(-1, -2), dtype)  # K: blocks transposed
    _close(cache[1], want_cache[1], dtype)


def _transposed(k_cache: torch.Tensor) -> torch.Tensor:
    """A [blocks, Hkv, bs, D] K cache in the CPU path's layout (each block transposed)."""
    return k_cache.transpose(-1, -2).contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        # (H, Hkv, D, block_size, [(queries, context) per row])
        (9, 3, 64, 16, [(1, 1), (1, 17), (1, 300), (5, 5), (40, 90), (1, 64)]),
        (4, 4, 32, 5, [(1, 3), (17, 17), (3, 40)]),
        (8, 1, 16, 1, [(2, 9), (1, 1)]),
        # the register-tiled path: head size 64 or 128, blocks of a multiple of 16 tokens
        (8, 2, 128, 32, [(1, 1), (1, 70), (20, 45), (3, 3)]),
        (6, 6, 64, 16, [(17, 40), (1, 33), (2, 2)]),
        # with AMX, whole 16-row tiles of a bf16 item take its tiles, spans ending off a 32-key boundary
        (9, 3, 64, 16, [(70, 75), (33, 33), (1, 50), (6, 90)]),
        # prefill items over several of the bf16 path's longer spans, the last one partial
        (9, 3, 64, 16, [(40, 600), (37, 300), (1, 520)]),
        (8, 2, 128, 32, [(20, 530), (5, 257)]),
    ],
)
def test_paged_attention_matches_gathered_reference(dtype, shape):
    """Decode rows, fresh prompts, chunks after a cached prefix (prefix-cache hits), GQA, MHA, MQA,
    block sizes that do not divide the lengths, and blocks scattered through the cache."""
    torch.manual_seed(1)
    h, hkv, d, bs, rows = shape
    max_blocks = max(-(-ctx // bs) for _, ctx in rows)
    num_blocks = len(rows) * max_blocks + 3
    k_cache = torch.randn(num_blocks, hkv, bs, d).to(dtype)
    v_cache = torch.randn(num_blocks, hkv, bs, d).to(dtype)
    perm = torch.randperm(num_blocks)
    tables = torch.zeros(len(rows), max_blocks, dtype=torch.int32)
    for i, (_, ctx) in enumerate(rows):
        nb = -(-ctx // bs)
        tables[i, :nb] = perm[i * max_blocks : i * max_blocks + nb].int()
    lens = torch.tensor([ctx for _, ctx in rows], dtype=torch.int32)
    starts = torch.tensor([0] + [n for n, _ in rows], dtype=torch.int32).cumsum(0).int()
    q = torch.randn(int(starts[-1]), h, d).to(dtype)
    scale = d**-0.5
    got = cpu_ops.paged_attention(q, _transposed(k_cache), v_cache, tables, lens, starts, scale)
    want = paged_attention_prefill_ref(q, k_cache, v_cache, tables, starts, lens, scale)
    _close(got, want, dtype, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape",
    [
        # (H, Hkv, D, block_size, tp): each rank of an uneven split, ranks starting inside a KV group
        (9, 3, 64, 16, 2),
        (9, 3, 64, 16, 4),
        (12, 4, 32, 5, 5),
        (14, 2, 128, 16, 3),
    ],
)
def test_paged_attention_on_a_ranks_heads_is_that_slice_of_the_whole(dtype, shape):
    """A tensor-parallel rank holds query heads [q0, q0 + n) and the KV heads they read: the kernel
    on those (with the rank's group and head offset) gives exactly those heads of the whole result."""
    from distgen.layers.linear import HeadShard

    torch.manual_seed(3)
    h, hkv, d, bs, tp = shape
    rows = [(1, 40), (23, 23), (7, 50), (1, 1)]
    max_blocks = max(-(-ctx // bs) for _, ctx in rows)
    k_cache = torch.randn(len(rows) * max_blocks, hkv, bs, d).to(dtype)
    v_cache = torch.randn(len(rows) * max_blocks, hkv, bs, d).to(dtype)
    tables = torch.randperm(len(rows) * max_blocks).view(len(rows), max_blocks).int()
    lens = torch.tensor([ctx for _, ctx in rows], dtype=torch.int32)
    starts = torch.tensor([0] + [n for n, _ in rows], dtype=torch.int32).cumsum(0).int()
    q = torch.randn(int(starts[-1]), h, d).to(dtype)
    whole = cpu_ops.paged_attention(q, _transposed(k_cache), v_cache, tables, lens, starts, 0.2)
    offsets = set()
    for rank in range(tp):
        s = HeadShard.of(h, hkv, tp, rank)
        offsets.add(s.head_offset)
        kv = slice(s.kv_start, s.kv_start + s.num_kv_heads)
        k_part, v_part = k_cache[:, kv].contiguous(), v_cache[:, kv].contiguous()
        q_part = q[:, s.q_start : s.q_start + s.num_heads]
        got = cpu_ops.paged_attention(
            q_part, _transposed(k_part), v_part, tables, lens, starts, 0.2, None, s.group, s.head_offset
        )
        assert torch.equal(got, whole[:, s.q_start : s.q_start + s.num_heads]), f"rank {rank} of {tp}"
    assert offsets != {0}  # the split puts some rank's first head inside a KV group


def test_paged_attention_reads_strided_queries():
    """q as the model passes it: a view into the QKV projection's output rows."""
    torch.manual_seed(2)
    h, hkv, d, bs = 6, 2, 32, 8
    qkv = torch.randn(10, (h + 2 * hkv) * d)
    q = qkv[:, : h * d].view(10, h, d)
    k_cache, v_cache = torch.randn(4, hkv, bs, d), torch.randn(4, hkv, bs, d)
    tables = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    lens, starts = torch.tensor([12, 5], dtype=torch.int32), torch.tensor([0, 7, 10], dtype=torch.int32)
    got = cpu_ops.paged_attention(q, _transposed(k_cache), v_cache, tables, lens, starts, 0.3)
    want = paged_attention_prefill_ref(q, k_cache, v_cache, tables, starts, lens, 0.3)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 15, 16, 17, 49152])
def test_argmax_rows_is_torch_argmax(dtype, n):
    torch.manual_seed(n)
    x = torch.randn(9, n).to(dtype)
    x[1] = x[1].round()  # many ties: the first index wins, as in torch
    x[2] = float("-inf")
    x[3, n // 2] = float("nan")  # a NaN is the maximum
    x[4, -1] = float("inf")
    x[5, n // 3 :: 7] = float("nan")
    x[6] = 0.0
    assert torch.equal(cpu_ops.argmax_rows(x), x.argmax(dim=-1))
    assert cpu_ops.argmax_rows(x[:1].view(n)).shape == ()


def test_only_float32_and_bfloat16_take_the_kernels():
    cpu = torch.device("cpu")
    assert dispatch.use_cpu_kernels_for(cpu, torch.float32)
    assert dispatch.use_cpu_kernels_for(cpu, torch.bfloat16)
    assert not dispatch.use_cpu_kernels_for(cpu, torch.float16)  # the torch path runs it
    with dispatch.kernel_mode("torch"):
        assert not dispatch.use_cpu_kernels_for(cpu, torch.float32)
