"""Scale-out layouts side by side: step time, bytes moved per step, and the pipeline bubble.

Runs one batch (greedy, ignore_eos) under each layout, one engine at a time, each in a fresh process
(a process that ran a model before keeps OpenMP threads that compete with the workers), the engine
core in that process so its steps can be counted, and prints per layout: output tok/s, steps, mean
step time, the control-plane bytes the executor broadcast per step (measured: the encoded messages
times the ranks they go to) and the data-plane bytes per step (from each step's scheduled token count
and the model's shapes: TP's all-reduces and logits gather, PP's hidden states and residual between
stages), and what those bytes would cost per step over NVLink (450 GB/s a direction) and 100 Gb/s
Ethernet.

``pp2-serial`` is pp 2 with one step in flight (micro-batching off): one stage works while the other
waits, the bubble that micro-batching removes. Layouts: tp1 tp2 pp2 pp2-serial tp2xpp2 dp2.

    .venv/bin/python benchmarks/scale.py [--layouts tp1,tp2,pp2,pp2-serial] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field

from distgen import LLM, SamplingParams

NVLINK_BPS = 450e9  # H100 NVLink 4: 900 GB/s both directions
ETHERNET_BPS = 100e9 / 8
LAYOUTS = {
    "tp1": dict(),
    "tp2": dict(tensor_parallel_size=2),
    "pp2": dict(pipeline_parallel_size=2),
    "pp2-serial": dict(pipeline_parallel_size=2),
    "tp2xpp2": dict(tensor_parallel_size=2, pipeline_parallel_size=2),
    "dp2": dict(data_parallel_size=2),
}


@dataclass
class Traffic:
    """What the engine core's executor launched, step by step."""

    steps: int = 0
    tokens: list[int] = field(default_factory=list)
    sampled: list[int] = field(default_factory=list)
    control_bytes: int = 0


def _watch(core, traffic: Traffic) -> None:
    """Count each step the executor launches, and the bytes of every message it broadcasts."""
    ex = core.executor
    if hasattr(ex, "_broadcast"):
        broadcast, world = ex._broadcast, ex.world_size

        def counting(msg):
            traffic.control_bytes += len(ex._encoder.encode(msg)) * world
            return broadcast(msg)

        ex._broadcast = counting

    def record(sched):
        traffic.steps += 1
        traffic.tokens.append(sched.total_num_scheduled_tokens)
        traffic.sampled.append(len(sched.num_scheduled_tokens))  # at most one sampled row each

    for name in ("submit", "execute_model"):
        run = getattr(ex, name)

        def wrapped(sched, run=run):
            record(sched)
            return run(sched)

        setattr(ex, name, wrapped)


def data_plane_bytes(shape: dict, tp: int, pp: int, tokens: int, sampled: int, elem: int) -> int:
    """Bytes on the wire for one step of ``tokens`` tokens: per TP group, ring all-reduces (each rank
    sends 2(n-1)/n of the tensor) after the vocab-parallel embedding and twice per layer, and the
    logits gathered to TP rank 0; between stages, hidden states and residual from every TP rank."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    total = 0
    if tp > 1:
        per_reduce = 2 * (tp - 1) * tokens * h * elem  # summed over the tp ranks
        total += (2 * layers + 1) * per_reduce
        total += (tp - 1) * sampled * -(-vocab // tp) * elem
    total += (pp - 1) * tp * 2 * tokens * h * elem
    return total


def run_layout(name: str, model: str | None, prompts: list, params: SamplingParams) -> dict:
    kwargs = dict(LAYOUTS[name])
    dp = "data_parallel_size" in kwargs
    if len(kwargs) and not dp:
        kwargs["distributed_executor_backend"] = "mp"
    # The engine core in this process, so that its steps are counted; replicas need processes of
    # their own (their steps are not counted).
    os.environ["DISTGEN_ENABLE_MULTIPROCESSING"] = "1" if dp else "0"
    llm = LLM(model, dtype="float32", kv_cache_memory=256 << 20, **kwargs)
    core = getattr(llm.llm_engine.client, "core", None)
    if name.endswith("-serial"):
        core.pipeline_depth = core.scheduler.pipeline_depth = 1
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm
    traffic = Traffic()
    if core is not None:
        _watch(core, traffic)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    shape = llm.llm_engine.model_config.hf_config
    llm.shutdown()
    tp, pp = kwargs.get("tensor_parallel_size", 1), kwargs.get("pipeline_parallel_size", 1)
    data = sum(data_plane_bytes(shape, tp, pp, t, s, 4) for t, s in zip(traffic.tokens, traffic.sampled))
    steps = max(traffic.steps, 1)
    return dict(
        layout=name,
        tok_s=sum(len(o.outputs[0].token_ids) for o in outs) / wall,
        steps=traffic.steps,
        step_ms=1e3 * wall / steps if traffic.steps else float("nan"),
        control_kb=traffic.control_bytes / steps / 1e3,
        data_kb=data / steps / 1e3,
        nvlink_us=1e6 * data / steps / NVLINK_BPS,
        eth_us=1e6 * data / steps / ETHERNET_BPS,
        tokens=[o.outputs[0].token_ids for o in outs],
    )


def _in_child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--requests", str(args.requests)]
    cmd += ["--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child: one layout, JSON out
    ap.add_argument("--layouts", default="tp1,tp2,pp2,pp2-serial,dp2")
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    prompts = [
        {"prompt_token_ids": [100 + 13 * i + j for j in range(args.prompt_len)]} for i in range(args.requests)
    ]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    if args.one:
        print(json.dumps(run_layout(args.one, args.model, prompts, params)))
        return
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; float32")
    print(f"{args.requests} requests x {args.prompt_len} prompt tokens -> {args.max_tokens} new tokens\n")
    rows = [_in_child(name, args) for name in args.layouts.split(",")]
    base = rows[0]
    head = (
        "layout        tok/s  vs first  steps  ms/step  control kB/step  data kB/step  NVLink us  100GbE us"
    )
    print(head)
    for r in rows:
        print(
            f"{r['layout']:<12} {r['tok_s']:6.1f}  {r['tok_s'] / base['tok_s']:7.2f}x  {r['steps']:5d}  "
            f"{r['step_ms']:7.1f}  {r['control_kb']:15.1f}  {r['data_kb']:12.1f}  {r['nvlink_us']:9.1f}  "
            f"{r['eth_us']:9.1f}   same tokens as first: {r['tokens'] == base['tokens']}"
        )
    by = {r["layout"]: r for r in rows}
    if "pp2" in by and "pp2-serial" in by:
        gain = by["pp2"]["tok_s"] / by["pp2-serial"]["tok_s"]
        print(f"\nPP bubble: micro-batching gives {gain:.2f}x the tok/s of one step in flight at pp 2")


if __name__ == "__main__":
    main()
