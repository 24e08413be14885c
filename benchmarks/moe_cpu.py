"""One mixture-of-experts MLP on the CPU: distgen's layer with the experts packed for its CPU GEMM,
the same layer on its plain torch path (``F.linear`` per expert), and transformers' Mixtral experts
(its eager per-expert loop) on the same weights and routing, in one run.

Each engine runs ``--layers`` distinct layers (so the weights stream from memory as in a real step)
for each token count; the best of 10 repeats is reported in ms per layer, with the ratio to
transformers.

    .venv/bin/python benchmarks/moe_cpu.py [--dtype bfloat16] [--tokens 1 8 64 256]
"""

from __future__ import annotations

import argparse
import sys

import torch
from cpu_gemm import best_of  # benchmarks/ is on the path when this runs as a script

from distgen.kernels import cpu_build
from distgen.kernels.reference import moe_route_ref
from distgen.layers.fused_moe import FusedMoE


def build(args, dtype: torch.dtype):
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    cfg = tf.MixtralConfig(
        hidden_size=args.hidden,
        intermediate_size=args.inter,
        num_local_experts=args.experts,
        experts_implementation="eager",
    )
    plain, packed, hf = [], [], []
    for _ in range(args.layers):
        w13 = torch.randn(args.experts, 2 * args.inter, args.hidden).to(dtype) * 0.02
        w2 = torch.randn(args.experts, args.hidden, args.inter).to(dtype) * 0.02
        for out, pack in ((plain, False), (packed, True)):
            layer = FusedMoE(args.experts, args.top_k, args.hidden, args.inter, True, dtype)
            layer.weight_loader(layer.w13_weight, w13, ("gate_up", None))
            layer.weight_loader(layer.w2_weight, w2, ("down", None))
            if pack:
                layer.pack_weights()
                assert layer.packed is not None
            out.append(layer)
        experts = MixtralExperts(cfg).to(dtype)
        experts.gate_up_proj.data.copy_(w13)
        experts.down_proj.data.copy_(w2)
        hf.append(experts)
    return plain, packed, hf


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    if cpu_build.try_load() is None:
        print("the CPU kernels cannot be built here", file=sys.stderr)
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    plain, packed, hf = build(args, dtype)
    print(
        f"{args.dtype}, {args.layers} layers of {args.experts} experts (top-{args.top_k}), hidden "
        f"{args.hidden}, intermediate {args.inter}, {torch.get_num_threads()} threads; ms per layer"
    )
    print(f"{'tokens':>6} | {'packed':>8} | {'F.linear':>8} | {'transformers':>12} | packed/transformers")
    with torch.inference_mode():
        for t in args.tokens:
            x = torch.randn(t, args.hidden).to(dtype)
            logits = torch.randn(t, args.experts)
            weights, ids = moe_route_ref(logits, args.top_k, True)
            runs = [
                lambda layers=packed, x=x, logits=logits: [m(x, logits) for m in layers],
                lambda layers=plain, x=x, logits=logits: [m(x, logits) for m in layers],
                lambda x=x, ids=ids, weights=weights: [m(x, ids, weights) for m in hf],
            ]
            times = [best_of(run, repeats=10) / args.layers * 1e3 for run in runs]
            p, f, h = times
            print(f"{t:>6} | {p:>8.3f} | {f:>8.3f} | {h:>12.3f} | {h / p:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
