"""What the priority policy buys urgent requests: their time to first token behind a backlog.

One batch of ``--background`` requests, then ``--urgent`` more given last, generated on the default
model with at most ``--max-num-seqs`` sequences at a time, twice in one run: on an engine with the
default ``fcfs`` policy (the urgent requests start after the whole backlog) and on one with
``scheduling_policy="priority"`` and the urgent ones at priority -1. The figures to read: the urgent
requests' mean time to first token under each policy and their ratio, and the whole batch's
throughput under each (the policy should cost nothing there).

    .venv/bin/python benchmarks/priority.py
    .venv/bin/python benchmarks/priority.py --background 128 --urgent 4 --max-num-seqs 16
"""

from __future__ import annotations

import argparse
import statistics
import time

from distgen import LLM, SamplingParams


def run(policy: str, args: argparse.Namespace) -> tuple[float, float, float]:
    """(mean urgent TTFT s, mean background TTFT s, output tok/s) under ``policy``."""
    llm = LLM(max_num_seqs=args.max_num_seqs, scheduling_policy=policy, seed=0)
    try:
        n = args.background + args.urgent
        prompts = [f"Write a short story about the number {i}:" for i in range(n)]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        priority = [0] * args.background + [-1] * args.urgent if policy == "priority" else None
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False, priority=priority)
        elapsed = time.perf_counter() - start
        ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outs]
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        return (
            statistics.mean(ttft[args.background :]),
            statistics.mean(ttft[: args.background]),
            tokens / elapsed,
        )
    finally:
        llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--background", type=int, default=64)
    ap.add_argument("--urgent", type=int, default=4)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()

    rows = {policy: run(policy, args) for policy in ("fcfs", "priority")}
    print(
        f"\n{args.background} background + {args.urgent} urgent requests (given last), "
        f"{args.max_tokens} tokens each, max_num_seqs={args.max_num_seqs}"
    )
    print("| policy | urgent TTFT (s) | background TTFT (s) | out tok/s |")
    print("|---|---|---|---|")
    for policy, (urgent, background, tps) in rows.items():
        print(f"| {policy} | {urgent:.3f} | {background:.3f} | {tps:.0f} |")
    (fu, _, ft), (pu, _, pt) = rows["fcfs"], rows["priority"]
    print(f"urgent TTFT fcfs/priority: {fu / pu:.1f}x; throughput priority/fcfs: {pt / ft:.2f}")


if __name__ == "__main__":
    main()
