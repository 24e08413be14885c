"""Per-step overhead of the executor's control plane: ``uni`` vs ``mp`` vs ``ray``, tensor parallel 2.

What is measured, in two parts, each with the executors side by side in one run (repeats interleaved,
so a change in the machine's load hits every backend alike):

1. **Control plane only** (the figure the issue asks for). The executors start their ranks with a
   ``NullWorker`` instead of distgen's ``Worker`` (through the executors' ``worker_cls`` hook): it loads
   no model and answers each step at once with one token per request, so a timed
   ``executor.execute_model(sched)`` is exactly the broadcast — encode the step once, push it to every
   rank, each rank decodes it, rank 0 encodes the answer, the executor decodes it — plus each rank's
   per-batch bookkeeping. ``uni`` calls the same NullWorker in-process (no broadcast at all) and is the
   floor. Two step shapes: a decode step of 32 running requests (one new token each, a new block id
   every fourth) and a prefill step of 8 new requests of 256 prompt tokens.
2. **End to end**: ``LLM.generate`` on a tiny random Llama (2 layers, hidden 64) at tp=2, 16 requests of
   64 greedy tokens, so each step is mostly control plane and gloo. Reported per output-token step.

Both executors run the same broadcast code. ``mp`` uses ipc:// sockets; ``ray`` uses ipc:// for ranks on
the engine's node and tcp:// on the node's address for the others, so on one host ray/mp compares the
executors themselves (Ray's actors against spawned processes), and the ``ray-tcp`` column (every rank
forced over tcp://, as when the ranks are on other nodes) shows what the transport adds. Ray starts its
workers 15 nice levels below the raylet; as root the benchmark gives them its own niceness, which mp's
workers inherit, so that the priority is not what is measured (``--ray-niceness`` keeps Ray's). Ray is
a private local instance (``RAY_ADDRESS=local``) unless ``RAY_ADDRESS`` is set. Absolute figures on a
shared machine are noise; read the ratios.

    .venv/bin/python benchmarks/step_overhead.py
    .venv/bin/python benchmarks/step_overhead.py --steps 1000 --repeats 21 --skip-e2e
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time

from distgen.sampling_params import SamplingParams
from distgen.sampling_spec import SamplingSpec
from distgen.workers.sampled_output import SampledOutput
from distgen.workers.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)

logger = logging.getLogger("benchmarks.step_overhead")
EQUAL_NICE = True  # --ray-niceness turns it off


class NullWorker:
    """A rank with distgen's Worker interface that runs no model: rank 0 answers one token per request."""

    def __init__(self, config, rank: int = 0, init_method=None, device_index=None) -> None:
        self.rank = rank

    def determine_num_blocks(self) -> int:
        return 1024

    def init_kv_cache(self, num_blocks: int) -> None:
        pass

    def submit(self, sched: SchedulerOutput) -> SampledOutput | None:
        if self.rank != 0:
            return None
        ids = [r.req_id for r in sched.new_reqs] + [r.req_id for r in sched.cached_reqs]
        return SampledOutput.done(ModelRunnerOutput(ids, [7] * len(ids)))

    def shutdown(self) -> None:
        pass


def decode_step(batch: int = 32) -> SchedulerOutput:
    reqs = [CachedRequestData(f"r{i}", [1000 + i], [i] if i % 4 == 0 else [], 300 + i) for i in range(batch)]
    return SchedulerOutput([], reqs, {r.req_id: 1 for r in reqs}, batch)


def prefill_step(batch: int = 8, prompt: int = 256) -> SchedulerOutput:
    params = SamplingSpec(temperature=0.0, max_tokens=64)
    reqs = [
        NewRequestData(
            f"p{i}", list(range(i, i + prompt)), prompt, params, list(range(i * 17, i * 17 + 17)), 0
        )
        for i in range(batch)
    ]
    return SchedulerOutput(reqs, [], {r.req_id: prompt for r in reqs}, batch * prompt)


def tiny_llama(path: str) -> str:
    """A random 2-layer Llama (4 heads, 2 KV heads) with the SmolLM2 tokenizer, saved at ``path``."""
    import torch
    import transformers as tf

    from distgen.model_loader.gguf import default_model_path, read_gguf

    cfg = tf.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    read_gguf(default_model_path()).load_tokenizer().save_pretrained(path)
    return path


def ray_actor_pids(title: bytes = b"ray::DistgenWorker") -> set[int]:
    """Processes of distgen's Ray worker actors on this machine (found by their process title)."""
    found = set()
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(title):
                    found.add(int(pid))
        except (OSError, ValueError):
            continue
    return found


def equalize_niceness(pids: set[int]) -> None:
    """Give every thread of ``pids`` (Ray actors) this process's niceness.

    Ray starts its worker processes 15 nice levels below their raylet, while mp's workers inherit the
    engine's. On an oversubscribed CPU that alone changes the step time (a woken low-priority worker
    does not preempt the executor before it finishes its sends), so it would be measured instead of the
    executors. Raising a priority needs root (CAP_SYS_NICE); without it this warns and leaves them.
    """
    if not EQUAL_NICE:
        return
    nice, done = os.getpriority(os.PRIO_PROCESS, 0), 0
    for pid in pids:
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
                done += 1
        except PermissionError:
            logger.warning("cannot raise the Ray workers' priority (not root): ray runs at Ray's niceness")
            return
        except OSError:
            continue
    logger.warning("gave %d threads of %d Ray workers the benchmark's niceness (%d)", done, len(pids), nice)


# ------------------------------------------------------------------------------------- control plane


def time_steps(run, sched: SchedulerOutput, steps: int) -> float:
    """Mean seconds per step over ``steps`` calls."""
    t0 = time.perf_counter()
    for _ in range(steps):
        run(sched)
    return (time.perf_counter() - t0) / steps


def control_plane(model: str, steps: int, repeats: int) -> dict[str, dict[str, float]]:
    import ray

    from distgen.executor.multiproc import MultiprocExecutor
    from distgen.executor.ray_executor import RayExecutor
    from distgen.frontend.args import EngineArgs

    config = EngineArgs(model=model, tensor_parallel_size=2, kv_cache_memory=16 << 20).create_config()
    # Two ray executors at once: 4 one-CPU bundles (logical CPUs; the ranks mostly wait).
    ray.init(
        address=os.environ["RAY_ADDRESS"],
        num_cpus=4,
        object_store_memory=100 << 20,
        include_dashboard=False,
        logging_level="WARNING",
    )
    null = NullWorker(config)
    runners = {"uni": lambda sched: null.submit(sched).get()}  # what UniProcExecutor.execute_model does

    class RayOverTcp(RayExecutor):
        local_ipc = False  # as between nodes

    executors = [
        MultiprocExecutor(config, NullWorker),
        RayExecutor(config, NullWorker),
        RayOverTcp(config, NullWorker),
    ]
    for name, ex in zip(("mp", "ray", "ray-tcp"), executors):
        runners[name] = ex.execute_model
    equalize_niceness(set(executors[1].worker_pids + executors[2].worker_pids))
    shapes = {"decode 32 x 1": decode_step(), "prefill 8 x 256": prefill_step()}
    results: dict[str, dict[str, float]] = {}
    try:
        for shape, sched in shapes.items():
            for run in runners.values():
                time_steps(run, sched, max(10, steps // 10))  # warm-up
            samples: dict[str, list[float]] = {name: [] for name in runners}
            for _ in range(repeats):
                for name, run in runners.items():
                    samples[name].append(time_steps(run, sched, steps))
            results[shape] = {name: statistics.median(v) for name, v in samples.items()}
    finally:
        for ex in executors:
            ex.shutdown()
        ray.shutdown()
    return results


# ---------------------------------------------------------------------------------------- end to end


def end_to_end(model: str, repeats: int, num_requests: int, max_tokens: int) -> dict[str, float]:
    from distgen import LLM

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(10 + i, 26 + i))} for i in range(num_requests)]
    before = ray_actor_pids()
    llms = {
        be: LLM(model, tensor_parallel_size=2, distributed_executor_backend=be, kv_cache_memory=16 << 20)
        for be in ("mp", "ray")
    }
    samples: dict[str, list[float]] = {be: [] for be in llms}
    equalize_niceness(ray_actor_pids() - before)
    try:
        for llm in llms.values():
            llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
        for _ in range(repeats):
            for be, llm in llms.items():
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                samples[be].append((time.perf_counter() - t0) / max_tokens)
    finally:
        for llm in llms.values():
            llm.shutdown()
    return {be: statistics.median(v) for be, v in samples.items()}


# -------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="timed steps per repeat (control plane)")
    ap.add_argument("--repeats", type=int, default=11, help="interleaved repeats; the median is reported")
    ap.add_argument("--skip-e2e", action="store_true", help="control plane only")
    ap.add_argument("--e2e-requests", type=int, default=16)
    ap.add_argument("--e2e-tokens", type=int, default=64)
    ap.add_argument(
        "--ray-niceness",
        action="store_true",
        help="leave the Ray workers at the niceness Ray gives them (15 levels below the raylet) instead "
        "of the benchmark's own, which mp's workers have",
    )
    args = ap.parse_args(argv)
    global EQUAL_NICE
    EQUAL_NICE = not args.ray_niceness
    # A private Ray instance, also for the engine processes of part 2, unless RAY_ADDRESS says otherwise
    # (with "auto" they would join any cluster running on this machine, another user's tests included).
    os.environ.setdefault("RAY_ADDRESS", "local")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="distgen-bench-") as tmp:
        model = tiny_llama(tmp)
        cp = control_plane(model, args.steps, args.repeats)
        print(f"\ncontrol plane, tp=2, NullWorker ranks, median of {args.repeats} x {args.steps} steps")
        print("(us per step; mp-uni and ray-uni: the cost of the broadcast; ray-tcp: ray with every rank")
        print("over tcp://, as across nodes)")
        head = ["uni", "mp", "ray", "ray/mp", "mp-uni", "ray-uni", "ray-tcp", "tcp/mp"]
        print(f"{'step':<18}" + "".join(f"{h:>9}" for h in head))
        for shape, r in cp.items():
            us = {k: v * 1e6 for k, v in r.items()}
            uni, mp, ray, tcp = us["uni"], us["mp"], us["ray"], us["ray-tcp"]
            cols = [f"{uni:.1f}", f"{mp:.1f}", f"{ray:.1f}", f"{ray / mp:.2f}", f"{mp - uni:.1f}"]
            cols += [f"{ray - uni:.1f}", f"{tcp:.1f}", f"{tcp / mp:.2f}"]
            print(f"{shape:<18}" + "".join(f"{c:>9}" for c in cols))
        if not args.skip_e2e:
            e2e = end_to_end(model, args.repeats, args.e2e_requests, args.e2e_tokens)
            print(
                f"\nend to end, tiny Llama tp=2, {args.e2e_requests} requests x {args.e2e_tokens} tokens, "
                f"median of {args.repeats} (ms per decode step)"
            )
            print(f"{'mp':>10}{'ray':>10}{'ray/mp':>9}")
            print(f"{e2e['mp'] * 1e3:>10.2f}{e2e['ray'] * 1e3:>10.2f}{e2e['ray'] / e2e['mp']:>9.2f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
