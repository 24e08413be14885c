"""Where a decode step's time goes, kernel by kernel (a diagnostic for the batch-1 roofline, no peer).

The model runner is driven in this process (no engine core, no scheduler) on the Llama-3.2-1B-shaped
random bf16 model of ``benchmarks/gpu.py``: one prompt is prefilled, then decode steps run

1. through the captured CUDA graph, timed end to end (host work, replay, LM head, sampling and the one
   sync that reads the token back): the step as the engine runs it;
2. eagerly, the same kernels launched one by one, under ``torch.profiler``: each kernel's GPU time,
   grouped by kind (GEMMs, attention, the fused small kernels, the rest).

The table puts the two side by side with the weight floor (weight bytes / copy bandwidth): if the
graph step is far above the kernels' sum, the time is in gaps between kernels or on the host; if the
sum itself is far above the floor, it is in the kernels (the GEMMs' share shows how far cuBLAS is from
the bandwidth, the small kernels' count and time what each launch costs).

    python benchmarks/decode_anatomy.py                 # on the GPU machine (gpu_check.sh runs it)
    python benchmarks/decode_anatomy.py --tiny          # anywhere: the script's plumbing, CPU ops
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import copy_bandwidth, sync, weight_bytes  # noqa: E402
from random_model import LLAMA_1B, LLAMA_TINY, build_random_model, llama_config, save_model_dir  # noqa: E402

KINDS = [  # (kind, pattern on the kernel or op name), first match wins
    ("attention", r"paged|attention|combine"),
    ("rotary + KV store", r"rotary|store_kv"),
    ("norms", r"rmsnorm"),
    ("SiLU-and-mul", r"silu"),
    ("GEMM", r"gemm|gemv|cutlass|xmma|nvjet|sm\d+_|addmm|\bmm\b|linear|matmul"),
    ("sampling", r"argmax|arg_max|reduce"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, pat in KINDS if re.search(pat, low)), "other")


class Driver:
    """Hand-scheduled steps of one request on a ModelRunner: a prefill, then decodes."""

    def __init__(self, runner, prompt: list[int], block_size: int) -> None:
        from distgen.sampling_spec import SamplingSpec
        from distgen.workers.scheduler_output import NewRequestData, SchedulerOutput

        self.runner, self.bs = runner, block_size
        self.params = SamplingSpec(temperature=0.0, max_tokens=1 << 20, ignore_eos=True)
        self.n = len(prompt)
        blocks = list(range(-(-(self.n + 1) // block_size)))
        out = runner.execute_model(
            SchedulerOutput(
                [NewRequestData("r", prompt, self.n, self.params, blocks, 0)], [], {"r": self.n}, self.n
            )
        )
        self.next_block = len(blocks)
        self.token = out.sampled_token_ids[0]

    def step(self) -> None:
        from distgen.workers.scheduler_output import CachedRequestData, SchedulerOutput

        new_blocks = []
        if (self.n + 1) % self.bs == 1 or self.bs == 1:  # position n + 1 starts a fresh block
            new_blocks, self.next_block = [self.next_block], self.next_block + 1
        cached = CachedRequestData("r", [self.token], new_blocks, self.n)
        out = self.runner.execute_model(SchedulerOutput([], [cached], {"r": 1}, 1))
        self.n += 1
        self.token = out.sampled_token_ids[0]


def _kernels(prof, cuda: bool) -> list[tuple[str, int, float]]:
    """(name, count, microseconds) of every GPU kernel; on a CPU, of every top-level aten op (the run
    takes the torch path there: the C++ kernels, called through ctypes, would not show)."""
    out = []
    for e in prof.events():
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA:
            out.append((e.name, 1, e.time_range.elapsed_us()))
        elif not cuda and e.cpu_parent is None and e.name.startswith("aten::"):
            out.append((e.name, 1, e.cpu_time))
    if cuda and not out:  # a profiler build that does not list kernels as events: its summary does
        for a in prof.key_averages():
            if a.self_device_time_total > 0 and not a.key.startswith(("aten::", "cuda")):
                out.append((a.key, a.count, a.self_device_time_total))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny model (CPU smoke run of the script)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="timed graph steps")
    p.add_argument("--profiled-steps", type=int, default=8)
    args = p.parse_args()
    from distgen.frontend.args import EngineArgs
    from distgen.workers.model_runner import ModelRunner

    cuda = args.device.startswith("cuda")
    mode = contextlib.ExitStack()  # held to the end of main: leaving it restores the kernel mode
    if not cuda:  # the CPU kernels are ctypes calls, which the profiler does not see: break down torch's ops
        from distgen.kernels.dispatch import kernel_mode

        mode.enter_context(kernel_mode("torch"))
    shape = LLAMA_TINY if args.tiny else LLAMA_1B
    dtype = torch.bfloat16 if cuda else torch.float32
    bs = 16
    max_len = args.prompt_len + args.steps + 2 * args.profiled_steps + 64
    num_blocks = -(-max_len // bs) + 2
    with tempfile.TemporaryDirectory(prefix="distgen-anatomy-") as path:
        model = build_random_model(llama_config(shape), dtype, args.device)
        wbytes = weight_bytes(model)
        save_model_dir(model, path)
        del model
        sync(args.device)
        bw = copy_bandwidth(args.device, (1 << 30) if not args.tiny else (16 << 20))
        config = EngineArgs(
            model=path,
            dtype=str(dtype).removeprefix("torch."),
            block_size=bs,
            max_model_len=max_len,
            max_num_seqs=1,
            num_gpu_blocks_override=num_blocks,
            device=args.device,
        ).create_config()
        runner = ModelRunner(config)
        runner.init_kv_cache(num_blocks)  # on CUDA: captures the batch-1 decode graph
        prompt = [(7 * i + 3) % shape["vocab_size"] for i in range(args.prompt_len)]
        drv = Driver(runner, prompt, bs)
        for _ in range(4):
            drv.step()

        # 1. The step as the engine runs it (the graph on CUDA).
        sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            drv.step()
        sync(args.device)
        step_ms = 1e3 * (time.perf_counter() - t0) / args.steps
        graphed = runner.graphs is not None

        # 2. The same step eagerly, kernel by kernel.
        runner.graphs = None
        drv.step()
        activities = [torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU]
        sync(args.device)
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(args.profiled_steps):
                drv.step()
            sync(args.device)
        eager_ms = 1e3 * (time.perf_counter() - t0) / args.profiled_steps

    per_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    names: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, count, us in _kernels(prof, cuda):
        for table in (per_kind[kind_of(name)], names[name]):
            table[0] += count
            table[1] += us
    n = args.profiled_steps
    total_us = sum(v[1] for v in per_kind.values()) / n
    floor_ms = 1e3 * wbytes / bw
    print("\nslowest kernels (per decode step):")
    for name, (cnt, us) in sorted(names.items(), key=lambda kv: -kv[1][1])[:12]:
        print(f"  {us / n:8.1f} us  x{cnt / n:5.1f}  {name[:110]}")
    print(f"\n| decode step, batch 1, prompt {args.prompt_len} | launches | us | share |")
    print("|---|---|---|---|")
    for k, (cnt, us) in sorted(per_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {k} | {cnt / n:.0f} | {us / n:.0f} | {100 * us / n / max(total_us, 1e-9):.0f}% |")
    print(f"| all kernels (eager step) | {sum(v[0] for v in per_kind.values()) / n:.0f} | {total_us:.0f} | |")
    how = "CUDA graph" if graphed else "no graph"
    print(
        f"\nstep as run ({how}): {step_ms:.3f} ms; eager step {eager_ms:.3f} ms (profiled); sum of its "
        f"kernels {total_us / 1e3:.3f} ms; weight floor {floor_ms:.3f} ms "
        f"({wbytes / 1e9:.2f} GB at {bw / 1e9:.0f} GB/s) -> {100 * floor_ms / step_ms:.0f}% of the roofline"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
