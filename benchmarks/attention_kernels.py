"""Paged-attention kernels alone on the GPU, at the Llama-3.2-1B shape (32 heads, 8 KV heads, head dim
64, block 16, bf16): the decode kernel against the prefill kernel used for one-token chunks (64-position
K/V tiles on tensor cores instead of one 16-token block per loop turn), and the prefill kernel on the
benchmark's prompts. Each case checks the kernels against the torch reference first, then times them
with ``triton.testing.do_bench`` (median) and reports the KV bytes read per microsecond.

At batch 1 an unsplit decode kernel runs only 8 programs (one per KV head), each walking the whole
context one block at a time; the kernel therefore splits the context of small batches (16 ranges at
batch 1) and combines the partial results in a second kernel. This measures the split against the
unsplit kernel, and the prefill kernel's wider tensor-core tiles on one-token chunks against both.

    python benchmarks/attention_kernels.py          # GPU only
"""

from __future__ import annotations

import sys

import torch

from distgen.kernels.paged_attention import num_splits_for, paged_attention_decode, paged_attention_decode_ref
from distgen.kernels.paged_prefill import paged_attention_prefill, paged_attention_prefill_ref

H, HKV, D, BS = 32, 8, 64, 16


def inputs(batch: int, ctx: int, q_len: int, device: str = "cuda"):
    g = torch.Generator(device="cpu").manual_seed(batch * 1000 + ctx)
    nb = -(-ctx // BS)
    num_blocks = batch * nb + 1
    perm = torch.randperm(num_blocks, generator=g)[: batch * nb].view(batch, nb)
    k = torch.randn(num_blocks, HKV, BS, D, generator=g).to(device, torch.bfloat16)
    v = torch.randn(num_blocks, HKV, BS, D, generator=g).to(device, torch.bfloat16)
    q = torch.randn(batch * q_len, H, D, generator=g).to(device, torch.bfloat16)
    table = perm.to(device, torch.int32)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
    starts = torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device)
    return q, k, v, table, lens, starts


def median_ms(fn, *args) -> float:
    from triton.testing import do_bench

    return do_bench(lambda: fn(*args), return_mode="median")


def check(out: torch.Tensor, ref: torch.Tensor, name: str) -> None:
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 1e-2, f"{name}: relative error {err:.2e}"


def main() -> int:
    if not torch.cuda.is_available():
        print("attention_kernels.py needs a CUDA device")
        return 0
    scale = D**-0.5
    rows = []
    for batch, ctx in ((1, 384), (1, 4096), (64, 384), (256, 256)):
        q, k, v, table, lens, starts = inputs(batch, ctx, 1)
        small = slice(0, min(batch, 4))
        ref = paged_attention_decode_ref(
            q[small].cpu(), k.cpu(), v.cpu(), table[small].cpu(), lens[small].cpu(), scale
        )
        dec = paged_attention_decode(q, k, v, table, lens, scale)
        pre = paged_attention_prefill(q, k, v, table, starts, lens, scale, 1)
        check(dec[small].cpu(), ref, "decode")
        check(pre[small].cpu(), ref, "prefill as decode")
        check(
            paged_attention_decode(q, k, v, table, lens, scale, num_splits=1)[small].cpu(),
            ref,
            "decode 1 split",
        )
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        t_dec = median_ms(paged_attention_decode, q, k, v, table, lens, scale)
        t_one = median_ms(paged_attention_decode, q, k, v, table, lens, scale, None, 1)
        t_pre = median_ms(paged_attention_prefill, q, k, v, table, starts, lens, scale, 1)
        splits = num_splits_for(batch, HKV)
        rows.append((f"decode b{batch} ctx{ctx}", f"decode kernel, {splits} splits (auto)", t_dec, kv_bytes))
        if splits > 1:
            rows.append((f"decode b{batch} ctx{ctx}", "decode kernel, 1 split", t_one, kv_bytes))
        rows.append((f"decode b{batch} ctx{ctx}", "prefill kernel, 1-token chunks", t_pre, kv_bytes))
    for batch in (1, 256):
        q, k, v, table, lens, starts = inputs(batch, 128, 128)
        small_q = slice(0, 128 * min(batch, 2))
        n = min(batch, 2)
        ref = paged_attention_prefill_ref(
            q[small_q].cpu(), k.cpu(), v.cpu(), table[:n].cpu(), starts[: n + 1].cpu(), lens[:n].cpu(), scale
        )
        out = paged_attention_prefill(q, k, v, table, starts, lens, scale, 128)
        check(out[small_q].cpu(), ref, "prefill")
        t = median_ms(paged_attention_prefill, q, k, v, table, starts, lens, scale, 128)
        rows.append((f"prefill b{batch} x 128", "prefill kernel", t, 2 * batch * 128 * HKV * D * 2))
    print(f"| case ({torch.cuda.get_device_name()}) | kernel | us | KV GB/s |")
    print("|---|---|---|---|")
    for case, kernel, ms, nbytes in rows:
        print(f"| {case} | {kernel} | {1e3 * ms:.1f} | {nbytes / (ms * 1e-3) / 1e9:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
