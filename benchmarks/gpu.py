"""GPU benchmark (issue 6): distgen against Hugging Face ``generate`` on a Llama-3.2-1B-shaped model.

One process, one device, one random-weight bfloat16 model (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocab 128256, tied embeddings) saved to a temporary directory and loaded by both
engines. Workloads: batch 1 (prompt 128, 256 new tokens) and batch 256 (prompt 128, 256 new tokens),
greedy, every request generating exactly its tokens. distgen runs with its decode CUDA graphs, with them
and async scheduling (the next step scheduled while the GPU runs this one), and eagerly. Peers in the
same run: ``generate`` eager (its default dynamic cache) and with ``cache_implementation="static"``
(transformers compiles its decode step; one untimed run of each shape compiles it first).

The batch-1 roofline: every decode step reads all weights once, so the fastest step is weight bytes /
copy bandwidth, with the bandwidth measured here by a large device-to-device copy (bytes read plus
written). The table's ``roofline`` column is that time over the measured step time; distgen's step
time is (256-token run - 1-token run) / 255, the peers' their whole run over 256 (prefill included).

The table is printed last, also when the script is stopped by SIGTERM (``timeout``): rows that finished
are kept. ``--json PATH`` writes the rows and the environment. ``--tiny`` runs every code path on a
model small enough for a CPU in seconds (no figures worth keeping).

    python benchmarks/gpu.py                      # on the GPU machine (see benchmarks/gpu_check.sh)
    python benchmarks/gpu.py --tiny               # anywhere: a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_model import LLAMA_1B, LLAMA_TINY, build_random_model, llama_config, save_model_dir  # noqa: E402


@dataclass
class Row:
    engine: str
    batch: int
    new_tokens: int  # per request
    seconds: float
    step_ms: float  # one decode step (see the module docstring)
    outputs: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def tok_per_s(self) -> float:
        return self.batch * self.new_tokens / self.seconds


class Stopped(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(device: str, nbytes: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 10 after warm-up."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * nbytes / sorted(times)[len(times) // 2]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter once (tied embeddings counted once): what a decode step must read."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------------------- distgen


def run_distgen(
    path: str, args, prompts: list[list[int]], eager: bool, rows: list[Row], async_scheduling: bool = False
) -> None:
    from distgen import LLM, SamplingParams

    bs = 16
    per_seq = -(-(args.prompt_len + args.new_tokens) // bs)
    llm = LLM(
        path,
        dtype=args.dtype,
        max_model_len=args.prompt_len + args.new_tokens + bs,
        max_num_seqs=args.batch,
        max_num_batched_tokens=max(8192, args.prompt_len),
        num_gpu_blocks_override=args.batch * per_seq + 64,
        enable_prefix_caching=False,
        enforce_eager=eager,
        async_scheduling=async_scheduling,
        device=args.device,
    )
    name = "distgen eager" if eager else "distgen async" if async_scheduling else "distgen"

    def gen(ps: list[list[int]], n: int) -> tuple[float, list[list[int]]]:
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        sync(args.device)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
        sync(args.device)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    gen(prompts[:1], 4)  # warm-up (kernels compiled at start, but first-call allocations)
    gen(prompts[:1], args.new_tokens)
    t1, _ = gen(prompts[:1], 1)
    tn, out = gen(prompts[:1], args.new_tokens)
    rows.append(Row(name, 1, args.new_tokens, tn, 1e3 * (tn - t1) / (args.new_tokens - 1), out))
    report(rows[-1])
    if not eager:
        gen(prompts[: min(8, args.batch)], 4)
        t, out = gen(prompts[: args.batch], args.new_tokens)
        rows.append(Row(name, args.batch, args.new_tokens, t, float("nan"), out))
        report(rows[-1])


def release(device: str) -> None:
    """Free what the last engine held before the next one starts."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- HF


def run_hf(model, args, prompts: list[list[int]], batch: int, static: bool, rows: list[Row]) -> None:
    ids = torch.tensor(prompts[:batch], device=args.device)
    kwargs = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        pad_token_id=1,
    )
    if static:
        kwargs["cache_implementation"] = "static"
        model.generate(ids, **kwargs)  # compiles the decode step for this shape (untimed)
    else:
        model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    sync(args.device)
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    sync(args.device)
    t = time.perf_counter() - t0
    name = "HF static" if static else "HF eager"
    new = out[:, ids.shape[1] :].tolist()
    rows.append(Row(name, batch, args.new_tokens, t, 1e3 * t / args.new_tokens, new))
    report(rows[-1])


# ------------------------------------------------------------------------------------------- report


def report(r: Row) -> None:
    print(f"  {r.engine:14s} batch {r.batch:4d}: {r.seconds:7.2f} s, {r.tok_per_s:9.1f} tok/s", flush=True)


def table(rows: list[Row], wbytes: int, bw: float) -> str:
    roof_ms = 1e3 * wbytes / bw if bw else float("nan")
    eager = {r.batch: r.tok_per_s for r in rows if r.engine == "HF eager"}
    static = {r.batch: r.tok_per_s for r in rows if r.engine == "HF static"}
    lines = [
        "| engine | batch | out tok/s | ms/step | roofline (b1) | x HF eager | x HF static |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        roof = f"{roof_ms / r.step_ms:.1%}" if r.batch == 1 and r.step_ms == r.step_ms else ""
        xe = f"{r.tok_per_s / eager[r.batch]:.2f}x" if r.batch in eager else ""
        xs = f"{r.tok_per_s / static[r.batch]:.2f}x" if r.batch in static else ""
        step = f"{r.step_ms:.2f}" if r.step_ms == r.step_ms else ""
        lines.append(f"| {r.engine} | {r.batch} | {r.tok_per_s:.1f} | {step} | {roof} | {xe} | {xs} |")
    lines.append(
        f"weights {wbytes / 1e9:.3f} GB, copy bandwidth {bw / 1e9:.0f} GB/s: "
        f"roofline {roof_ms:.3f} ms/step = {1e3 / roof_ms:.0f} tok/s at batch 1"
    )
    return "\n".join(lines)


def agreement(rows: list[Row]) -> str:
    """How many of distgen's batch-1/batch-N greedy sequences start with HF eager's first 16 tokens."""
    out = []
    ref = {r.batch: r.outputs for r in rows if r.engine == "HF eager"}
    for r in rows:
        if r.engine.startswith("distgen") and r.batch in ref and r.outputs:
            same = sum(a[:16] == b[:16] for a, b in zip(r.outputs, ref[r.batch]))
            out.append(f"{r.engine} b{r.batch}: {same}/{len(r.outputs)} equal to HF eager over 16 tokens")
    return "; ".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model and workload (CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-distgen-eager", action="store_true")
    p.add_argument("--skip-distgen-async", action="store_true", help="no async-scheduling rows")
    p.add_argument("--json", help="write the rows and the environment here")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.prompt_len, args.new_tokens = min(args.batch, 4), 16, 8
    signal.signal(signal.SIGTERM, _on_sigterm)
    dtype = getattr(torch, args.dtype)
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    rows: list[Row] = []
    wbytes, bw = 0, 0.0
    env = dict(
        device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        torch=torch.__version__,
        tiny=args.tiny,
    )
    print(f"== benchmarks/gpu.py on {env['device']}, torch {torch.__version__}", flush=True)
    rng = random.Random(0)
    vocab = shape["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    try:
        bw = copy_bandwidth(args.device, (1 << 30) if not args.tiny else (16 << 20))
        print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
        with tempfile.TemporaryDirectory(prefix="distgen-gpu-bench-") as path:
            t0 = time.perf_counter()
            model = build_random_model(llama_config(shape), dtype, args.device)
            wbytes = weight_bytes(model)
            save_model_dir(model, path)
            secs = time.perf_counter() - t0
            print(f"random model ({wbytes / 1e9:.2f} GB) saved in {secs:.1f}s", flush=True)
            # What the targets compare runs first, so a run stopped by its time limit keeps it:
            # distgen (graphs, then with async scheduling), HF eager at the large batch, HF static;
            # then the rows only shown for reference (HF eager batch 1, distgen eager).
            run_distgen(path, args, prompts, eager=False, rows=rows)
            release(args.device)
            if not args.skip_distgen_async:
                run_distgen(path, args, prompts, eager=False, rows=rows, async_scheduling=True)
                release(args.device)
            if not args.skip_hf:
                run_hf(model, args, prompts, args.batch, static=False, rows=rows)
                if not args.skip_hf_static:
                    for batch in (1, args.batch):
                        run_hf(model, args, prompts, batch, static=True, rows=rows)
                run_hf(model, args, prompts, 1, static=False, rows=rows)
            if not args.skip_distgen_eager:
                release(args.device)
                run_distgen(path, args, prompts, eager=True, rows=rows)
    except (Stopped, KeyboardInterrupt) as e:
        print(f"stopped early ({e}): the table has the rows that finished", flush=True)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                data = [dict(asdict(r), tok_per_s=r.tok_per_s, outputs=None) for r in rows]
                json.dump(dict(env=env, weight_bytes=wbytes, copy_bw=bw, rows=data), f, indent=1)
        print(agreement(rows))
        print(table(rows, wbytes, bw), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
