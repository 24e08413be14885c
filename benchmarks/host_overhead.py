"""Host time of one decode step along the GPU path, by phase, measured on any machine.

On a GPU a decode step replays a CUDA graph; everything around it (scheduling, the step's diff, the
graph's input buffers, sampling metadata, the engine core's outputs, the front end's processing) is
Python on the host, and unless it is short it adds to every step. This runs the engine in-process on
the CPU with the model's forward replaced by a no-op that returns zeros: the runner goes through the
decode-graph path (``DecodeGraphs`` with no captured graph runs its forward on the static buffers),
so what is timed is the host work of a real step, and nothing else.

A diagnostic, not a comparison: there is no peer to run beside it. Compare commits by running it on
each in the same session (``git worktree``); ``benchmarks/NOTES.md`` keeps the figures.

    python benchmarks/host_overhead.py                  # batch 1 and 256, 128-token prompts
    python benchmarks/host_overhead.py --batch 64 --profile /tmp/host.prof
"""

from __future__ import annotations

import argparse
import cProfile
import os
import sys
import tempfile
import time

os.environ.setdefault("DISTGEN_ENABLE_MULTIPROCESSING", "0")  # the phases are timed in this process

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_model import LLAMA_TINY, build_random_model, llama_config, save_model_dir  # noqa: E402

HIDDEN, VOCAB = 32, 128  # small: the tensor ops standing in for GPU kernels cost next to nothing


ORDER = [  # the phases, in the order they are printed
    "scheduler.schedule",
    "executor.execute_model",
    "  runner: graph inputs",
    "  runner: logits + sampling",
    "core: update + outputs",
    "front end: process_outputs",
]


def _timed(obj, name: str, key: str, phases: dict[str, float]) -> None:
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[key] = phases.get(key, 0.0) + time.perf_counter() - t0

    setattr(obj, name, wrapper)


def measure(path: str, batch: int, prompt_len: int, steps: int, profile: str | None) -> None:
    from distgen import LLM, SamplingParams
    from distgen.workers.cuda_graphs import DecodeGraphs

    llm = LLM(
        path,
        max_model_len=prompt_len + steps + 16,
        max_num_seqs=batch,
        max_num_batched_tokens=max(8192, prompt_len),
        enable_prefix_caching=False,
    )
    core = llm.llm_engine.client.core
    runner = core.executor.worker.runner
    # The decode-graph path with a no-op "graph", and logits without an LM head.
    max_blocks = -(-(prompt_len + steps + 16) // runner.block_size)
    graphs = DecodeGraphs(runner.model, batch, max_blocks, pad_block=0, device=runner.device)
    graphs._forward = lambda b: torch.zeros(b, HIDDEN)
    runner.graphs = graphs
    runner.model.compute_logits = lambda h: torch.zeros(h.shape[0], VOCAB)

    phases: dict[str, float] = {}
    _timed(core.scheduler, "schedule", "scheduler.schedule", phases)
    _timed(core.executor, "execute_model", "executor.execute_model", phases)
    _timed(runner, "_replay_decode", "  runner: graph inputs", phases)
    _timed(runner, "_sample", "  runner: logits + sampling", phases)
    _timed(core, "_make_outputs", "core: update + outputs", phases)
    _timed(llm.llm_engine.output_processor, "process_outputs", "front end: process_outputs", phases)

    ids = [[3 + (i * 7 + j) % (VOCAB - 3) for j in range(prompt_len)] for i in range(batch)]
    prompts = [{"prompt_token_ids": p} for p in ids]

    def gen(n: int) -> tuple[float, dict[str, float]]:
        phases.clear()
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - t0, dict(phases)

    gen(4)
    runs = [(gen(1), gen(steps + 1)) for _ in range(3)]
    (t1, p1), (tn, pn) = min(runs, key=lambda r: r[1][0] - r[0][0])
    per_step = 1e3 * (tn - t1) / steps
    print(f"\nbatch {batch}: {per_step:.3f} ms of host time per decode step ({steps} steps, best of 3)")
    for key in ORDER:
        total = pn.get(key, 0.0)
        print(f"  {key:30s} {1e3 * (total - p1.get(key, 0.0)) / steps:7.3f} ms")
    if profile:
        prof = cProfile.Profile()
        prof.runcall(gen, steps + 1)
        prof.dump_stats(profile)
        print(f"  cProfile of one run written to {profile}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--profile", help="write a cProfile of one timed run (the last batch size) here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = dict(
        LLAMA_TINY,
        num_hidden_layers=1,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN,
        num_attention_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=max(1024, args.prompt_len + args.steps + 16),
    )
    with tempfile.TemporaryDirectory() as path:
        save_model_dir(build_random_model(llama_config(shape), torch.float32, "cpu"), path)
        for b in args.batch:
            measure(path, b, args.prompt_len, args.steps, args.profile if b == args.batch[-1] else None)


if __name__ == "__main__":
    main()
