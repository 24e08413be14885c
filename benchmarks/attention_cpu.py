"""distgen's CPU paged attention against torch's own CPU attention (``F.scaled_dot_product_attention``,
its flash-attention kernel) on the default model's heads (9 query heads over 3 KV heads, head size 64,
blocks of 16 tokens), in one run.

- prefill: 4 prompts of 1024 tokens, causal, read through scattered blocks of the paged cache;
- decode: 64 rows of one query over 320 cached tokens each, in a cache 40x larger than what they read
  (blocks land on pages the TLB has not seen, as in an engine's cache); the same blocks call after call,
  so mostly from L3;
- decode from memory (distgen only): the same rows over 24 layers' caches in turn, as an engine step
  reads them, so each call's K/V come from memory: the figure that bounds a decode step.

torch's kernel gets the same K/V already gathered into dense per-sequence tensors (the copy is not timed)
and, for decode, one call per row batch with the keys of equal-length rows stacked; its causal prefill
skips fully masked tiles as distgen's does. The best of 5 calls is reported as attention GFLOP/s
(2 matmuls, the causal half for prefill) and, for decode, as KV GB/s read.

    .venv/bin/python benchmarks/attention_cpu.py [--threads N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from cpu_gemm import best_of  # benchmarks/ is on the path when this runs as a script

from distgen.kernels import cpu_build, cpu_ops

H, HKV, D, BS = 9, 3, 64, 16


def paged_inputs(nseq: int, ctx: int, q_len: int, dtype: torch.dtype, spread: int = 1):
    g = torch.Generator().manual_seed(nseq * 7 + ctx)
    nb = ctx // BS
    total = nseq * nb * spread
    k = torch.randn(total, HKV, BS, D, generator=g).to(dtype)
    v = torch.randn(total, HKV, BS, D, generator=g).to(dtype)
    table = torch.randperm(total, generator=g)[: nseq * nb].view(nseq, nb).int().contiguous()
    lens = torch.full((nseq,), ctx, dtype=torch.int32)
    starts = torch.arange(0, nseq * q_len + 1, q_len, dtype=torch.int32)
    q = torch.randn(nseq * q_len, H, D, generator=g).to(dtype)
    return q, k, v, table, lens, starts


def dense_kv(k: torch.Tensor, v: torch.Tensor, table: torch.Tensor, ctx: int):
    """[B, H, ctx, D] K and V per sequence, each KV head repeated for its query heads."""
    nseq = table.shape[0]
    kd = k[table.long()].permute(0, 2, 1, 3, 4).reshape(nseq, HKV, ctx, D)
    vd = v[table.long()].permute(0, 2, 1, 3, 4).reshape(nseq, HKV, ctx, D)
    return kd.repeat_interleave(H // HKV, 1).contiguous(), vd.repeat_interleave(H // HKV, 1).contiguous()


def prefill(dtype: torch.dtype, nseq: int = 4, ctx: int = 1024) -> tuple[float, float, float]:
    q, k, v, table, lens, starts = paged_inputs(nseq, ctx, ctx, dtype)
    scale = D**-0.5
    ours = cpu_ops.paged_attention(q, k.transpose(-1, -2).contiguous(), v, table, lens, starts, scale)
    kt = k.transpose(-1, -2).contiguous()
    kd, vd = dense_kv(k, v, table, ctx)
    qd = q.view(nseq, ctx, H, D).transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
    err = (ours.view(nseq, ctx, H, D).transpose(1, 2).float() - ref.float()).abs().max().item()
    t_ours = best_of(lambda: cpu_ops.paged_attention(q, kt, v, table, lens, starts, scale))
    t_torch = best_of(lambda: F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale))
    flop = nseq * 2 * 2 * (ctx * ctx / 2) * D * H
    return flop / t_ours / 1e9, flop / t_torch / 1e9, err


def decode(dtype: torch.dtype, nseq: int = 64, ctx: int = 320) -> tuple[float, float, float, float]:
    q, k, v, table, lens, starts = paged_inputs(nseq, ctx, 1, dtype, spread=40)
    scale = D**-0.5
    kt = k.transpose(-1, -2).contiguous()
    ours = cpu_ops.paged_attention(q, kt, v, table, lens, starts, scale)
    kd, vd = dense_kv(k, v, table, ctx)
    qd = q.view(nseq, 1, H, D).transpose(1, 2).contiguous()
    ref = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
    err = (ours.view(nseq, 1, H, D).transpose(1, 2).float() - ref.float()).abs().max().item()
    t_ours = best_of(lambda: cpu_ops.paged_attention(q, kt, v, table, lens, starts, scale))
    t_torch = best_of(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale))
    kv_bytes = 2 * nseq * ctx * HKV * D * k.element_size()
    return t_ours * 1e3, t_torch * 1e3, kv_bytes / t_ours / 1e9, err


def decode_from_memory(
    dtype: torch.dtype, nseq: int = 64, ctx: int = 320, layers: int = 24
) -> tuple[float, float]:
    """The decode call as an engine step makes it: one per layer, each over its own cache, so that what
    a call reads (31 MB in float32) has left the caches by the time its layer comes round again (the
    ``decode`` row reads the same blocks call after call, mostly from L3). ms per layer and KV GB/s."""
    q, k, v, table, lens, starts = paged_inputs(nseq, ctx, 1, dtype, spread=2)
    caches = [(k.transpose(-1, -2).contiguous(), v)]
    for _ in range(layers - 1):
        caches.append(
            (
                torch.randn_like(caches[0][0], dtype=torch.float32).to(dtype),
                torch.randn_like(v, dtype=torch.float32).to(dtype),
            )
        )
    scale = D**-0.5

    def step():
        for kt, vc in caches:
            cpu_ops.paged_attention(q, kt, vc, table, lens, starts, scale)

    t = best_of(step) / layers
    return t * 1e3, 2 * nseq * ctx * HKV * D * k.element_size() / t / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch and OpenMP threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if cpu_build.try_load() is None:
        print("the CPU kernels are unavailable here (no C++ compiler?)")
        return 1
    print(f"threads {torch.get_num_threads()}; H {H}, Hkv {HKV}, D {D}, blocks of {BS}")
    print("| dtype | work | distgen | torch SDPA | ratio | max abs diff |")
    print("|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        ours, theirs, err = prefill(dtype)
        print(
            f"| {name} | prefill 4 x 1024, GFLOP/s | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f} | "
            f"{err:.1e} |"
        )
        t_ours, t_torch, gbs, err = decode(dtype)
        print(
            f"| {name} | decode 64 x 320, ms ({gbs:.1f} GB/s KV) | {t_ours:.2f} | {t_torch:.2f} | "
            f"{t_torch / t_ours:.2f} | {err:.1e} |"
        )
        t_mem, gbs = decode_from_memory(dtype)
        print(
            f"| {name} | decode 64 x 320, 24 layers' caches, ms a layer ({gbs:.1f} GB/s KV) "
            f"| {t_mem:.2f} | — | — | — |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
