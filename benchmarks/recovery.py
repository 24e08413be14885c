"""Worker recovery: how long a restart takes, and that the outputs do not change.

Generates a batch once, then again with one worker SIGKILLed a second in; prints the time of the
restart itself (the engine core's), the whole generation's with and without the kill, and whether
every request got the same greedy tokens. Default: the default model at tp 3 on the mp backend.

    .venv/bin/python benchmarks/recovery.py [--backend mp|ray] [--tp 3] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from distgen import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backend", choices=["mp", "ray"], default="mp")
    ap.add_argument("--tp", type=int, default=3)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    os.environ["DISTGEN_ENABLE_MULTIPROCESSING"] = "0"  # the engine core here: its restart is timed
    if args.backend == "ray":
        import ray

        ray.init(num_cpus=args.tp, include_dashboard=False)
    llm = LLM(
        args.model,
        tensor_parallel_size=args.tp,
        distributed_executor_backend=args.backend,
        dtype="float32",
        kv_cache_memory=256 << 20,
    )
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    prompts = [{"prompt_token_ids": [100 + 7 * i + j for j in range(32)]} for i in range(8)]
    t0 = time.monotonic()
    want = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    plain = time.monotonic() - t0
    core = llm.llm_engine.client.core
    victim = core.executor.worker_pids[1]
    threading.Timer(1.0, lambda: os.kill(victim, signal.SIGKILL)).start()
    t0 = time.monotonic()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    killed = time.monotonic() - t0
    print(
        f"{args.backend} tp={args.tp}: generation {plain:.1f}s; with a worker killed {killed:.1f}s, the "
        f"restart itself {core.last_restart_s:.1f}s; restarts {core.num_worker_restarts}; "
        f"same greedy tokens: {got == want}"
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
