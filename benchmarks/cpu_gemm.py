"""distgen's packed CPU GEMM against oneDNN's packed GEMM (the layout PyTorch inductor's CPU freezing
uses) and plain ``F.linear``, on the default model's linear shapes, in one run.

For each row count, the four linear layers of each of the model's 30 layers (30 distinct weights, so
they stream from memory as in a real step) run once per engine; the best of 5 repeats is reported as
GFLOP/s and as weight GB/s (what matters at one row, where the product is a read of the weights).

    .venv/bin/python benchmarks/cpu_gemm.py [--dtype bfloat16] [--rows 1 4 16 64 256 1024]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from distgen.kernels import cpu_build, cpu_gemm

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # qkv, o, gate_up, down of SmolLM2-135M
LAYERS = 30


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 256, 1024])
    args = ap.parse_args()
    if cpu_build.try_load() is None:
        print("the CPU kernels cannot be built here", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weights = [[torch.randn(n, k).to(dtype) for n, k in SHAPES] for _ in range(LAYERS)]
    ours = [[cpu_gemm.pack(w) for w in layer] for layer in weights]
    onednn = [[torch.ops.mkldnn._reorder_linear_weight(w, 64) for w in layer] for layer in weights]
    params = sum(n * k for n, k in SHAPES) * LAYERS
    print(f"{args.dtype}, {LAYERS} layers x {SHAPES}, {torch.get_num_threads()} threads")
    head = f"{'rows':>5} | {'distgen GF/s':>12} {'GB/s':>6} | {'oneDNN GF/s':>11} {'GB/s':>6}"
    print(f"{head} | {'F.linear':>8} | ratio")

    def run_ours(xs):
        for layer in ours:
            for p in layer:
                cpu_gemm.linear(xs[p.in_features], p, None)

    def run_onednn(xs):
        for layer in onednn:
            for p, (_, k) in zip(layer, SHAPES):
                torch.ops.mkldnn._linear_pointwise(xs[k], p, None, "none", [], "")

    def run_plain(xs):
        for layer in weights:
            for w in layer:
                F.linear(xs[w.shape[1]], w)

    nbytes = params * weights[0][0].element_size()
    for m in args.rows:
        xs = {k: torch.randn(m, k).to(dtype) for _, k in SHAPES}
        t_ours, t_dnn, t_plain = (
            best_of(lambda f=f, xs=xs: f(xs)) for f in (run_ours, run_onednn, run_plain)
        )
        gf = [2 * params * m / t / 1e9 for t in (t_ours, t_dnn, t_plain)]
        print(
            f"{m:>5} | {gf[0]:>12.1f} {nbytes / t_ours / 1e9:>6.1f} | {gf[1]:>11.1f} "
            f"{nbytes / t_dnn / 1e9:>6.1f} | {gf[2]:>8.1f} | {t_dnn / t_ours:.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
