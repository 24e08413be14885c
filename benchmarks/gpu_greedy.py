"""Greedy correctness on the GPU: distgen on ``--device`` against transformers on the CPU (float32).

Tiny random models (Llama with GQA, Qwen3 with q/k norms, OPT) are saved to a temporary directory;
transformers computes the greedy reference on the CPU, then distgen generates on the device in float32
in several scenarios: CUDA graphs for decode (the default on CUDA), ``enforce_eager``, chunked
prefill (7-token step budget), prefix-cache hits (every prompt twice, then again), and async scheduling
(decode inputs taken from the last step's samples on the device). Each must pass
DESIGN.md's rule (identical tokens, or a near-tie flip within the reference's top-5 at the first
divergence); the exact-match rate is reported. Exits 1 if any scenario fails.

    python benchmarks/gpu_greedy.py                     # device: cuda when available
    python benchmarks/gpu_greedy.py --device cpu --archs llama   # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from random_model import build_random_model, save_model_dir, tiny_configs  # noqa: E402

VOCAB = 4096
MAX_NEW = 12
SCENARIOS = {
    "graphs": dict(),
    "async-scheduling": dict(async_scheduling=True),  # the newest GPU path: early, in case time runs out
    "eager": dict(enforce_eager=True),
    "chunked-prefill": dict(max_num_batched_tokens=7),
    "prefix-cache": dict(block_size=4),
}


class Stopped(Exception):
    pass


def _on_sigterm(signum, frame):
    raise Stopped(f"signal {signum}")


def prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(3, 60))] for _ in range(n)]
    return out + [[rng.randrange(3, VOCAB) for _ in range(150)]]


def hf_greedy(model, ps: list[list[int]]) -> list[tuple[list[int], list[list[int]]]]:
    """transformers' greedy tokens and top-5 ids per step, one prompt at a time, on the CPU."""
    refs = []
    with torch.inference_mode():
        for p in ps:
            res = model(torch.tensor([p]), use_cache=True)
            toks, top5 = [], []
            for _ in range(MAX_NEW):
                logits = res.logits[0, -1].float()
                toks.append(int(logits.argmax()))
                top5.append(logits.topk(5).indices.tolist())
                res = model(torch.tensor([[toks[-1]]]), past_key_values=res.past_key_values, use_cache=True)
            refs.append((toks, top5))
    return refs


def exact_rate(refs, outs) -> tuple[float, str]:
    """DESIGN.md's rule; returns (exact-match rate, first violation or '')."""
    exact = 0
    for i, ((ref, top5), ours) in enumerate(zip(refs, outs)):
        if len(ours) != len(ref):
            return 0.0, f"prompt {i}: {len(ours)} tokens, expected {len(ref)}"
        for j, (a, b) in enumerate(zip(ref, ours)):
            if a != b:
                if b not in top5[j]:
                    return 0.0, f"prompt {i} token {j}: {b}, reference {a}, not in its top-5 {top5[j]}"
                break
        else:
            exact += 1
    return exact / len(refs), ""


def generate(llm, ps: list[list[int]]) -> list[list[int]]:
    from distgen import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in ps], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--archs", nargs="+", default=["llama", "qwen3", "opt"])
    p.add_argument("--scenarios", nargs="+", default=list(SCENARIOS))
    args = p.parse_args()
    ps = prompts(12, seed=1)
    results, failed = [], False
    configs = tiny_configs(VOCAB)
    signal.signal(signal.SIGTERM, _on_sigterm)  # a time limit still prints the rows that finished
    try:
        run_all(args, ps, configs, results)
    except Stopped as e:
        print(f"stopped early ({e})", flush=True)
        failed = True
    failed |= not all(r[3] for r in results)
    print(f"| arch | scenario ({args.device}, float32) | exact match | DESIGN.md rule | s |")
    print("|---|---|---|---|---|")
    for arch, name, rate, ok, err, secs in results:
        print(f"| {arch} | {name} | {rate:.0%} | {'pass' if ok else 'FAIL: ' + err} | {secs:.1f} |")
    return 1 if failed else 0


def run_all(args, ps: list[list[int]], configs: dict, results: list) -> None:
    from distgen import LLM

    with tempfile.TemporaryDirectory(prefix="distgen-greedy-") as root:
        refs = {}
        for arch in args.archs:
            model = build_random_model(configs[arch], torch.float32, "cpu")
            save_model_dir(model, os.path.join(root, arch))
            refs[arch] = hf_greedy(model, ps)
        # Scenario-major: under a time limit every architecture gets the first scenarios.
        for name in args.scenarios:
            for arch in args.archs:
                path = os.path.join(root, arch)
                t0 = time.perf_counter()
                # 16 sequences at most: 5 decode graphs to capture per engine instead of 20.
                kwargs = dict(dtype="float32", device=args.device, max_num_seqs=16)
                kwargs["num_gpu_blocks_override"] = 512
                llm = LLM(path, **{**kwargs, **SCENARIOS[name]})
                if name == "prefix-cache":  # the second copies hit the first ones' blocks, then all do
                    rate, err = exact_rate(refs[arch], generate(llm, ps + ps)[len(ps) :])
                    if not err:
                        rate, err = exact_rate(refs[arch], generate(llm, ps))
                else:
                    rate, err = exact_rate(refs[arch], generate(llm, ps))
                ok = not err and rate >= 0.5
                results.append((arch, name, rate, ok, err, time.perf_counter() - t0))
                print(f"  {arch}/{name}: exact {rate:.0%} {'ok' if ok else 'FAIL ' + err}", flush=True)
                del llm


if __name__ == "__main__":
    sys.exit(main())
