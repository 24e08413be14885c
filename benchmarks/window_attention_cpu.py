"""The CPU paged-attention kernel on decode rows with and without a sliding window: a window skips the
blocks before it, so a 512-key window over 4096-token contexts reads an eighth of the K/V. Shapes: 8
query heads over 1 KV head at head size 256 (Gemma's) and over 2 at 128; batch 8, blocks of 16.

    OMP_NUM_THREADS=1 python benchmarks/window_attention_cpu.py   # one thread: steadier on a shared box
"""

from __future__ import annotations

import time

import torch

from distgen.kernels import cpu_ops


def run(h, hkv, d, bs, batch, ctx, window, dtype, reps=20) -> float:
    """Median milliseconds of one call over ``batch`` decode rows of ``ctx`` tokens each."""
    g = torch.Generator().manual_seed(0)
    nb = -(-ctx // bs)
    kc = torch.randn(batch * nb + 1, hkv, bs, d, generator=g).to(dtype)  # layout does not matter here
    vc = torch.randn(batch * nb + 1, hkv, bs, d, generator=g).to(dtype)
    table = torch.randperm(batch * nb, generator=g).view(batch, nb).int().contiguous()
    lens = torch.full((batch,), ctx, dtype=torch.int32)
    starts = torch.arange(batch + 1, dtype=torch.int32)
    q = torch.randn(batch, h, d, generator=g).to(dtype)

    def f():
        return cpu_ops.paged_attention(q, kc, vc, table, lens, starts, d**-0.5, window=window)

    for _ in range(3):
        f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main() -> None:
    for h, hkv, d in [(8, 1, 256), (8, 2, 128)]:
        for dtype in (torch.float32, torch.bfloat16):
            full = run(h, hkv, d, 16, 8, 4096, None, dtype)
            win = run(h, hkv, d, 16, 8, 4096, 512, dtype)
            name = str(dtype).removeprefix("torch.")
            print(
                f"H{h} Hkv{hkv} D{d} {name}, 8 decodes of 4096: full {full:.2f} ms, window 512 {win:.2f} ms, "
                f"{full / win:.1f}x"
            )


if __name__ == "__main__":
    main()
