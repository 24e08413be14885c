"""What structured outputs cost: the same batch generated free and under a JSON schema, in one run.

The default model generates ``--num-requests`` sampled replies of exactly ``--max-tokens`` tokens
twice: free, then held to a JSON schema (an array of at least 100 strings: it cannot end sooner, so
both runs produce the same number of tokens). The figure to read is the constrained/free throughput
ratio; absolute numbers on a shared machine are noise. Prompts are the same; each side is warmed up.

    .venv/bin/python benchmarks/structured_outputs.py
    .venv/bin/python benchmarks/structured_outputs.py --num-requests 128 --max-tokens 64
"""

from __future__ import annotations

import argparse
import json
import time

from distgen import LLM, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 100}


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args()

    llm = LLM()
    try:
        prompts = [
            f"List {i + 3} short names of fruit, as a JSON array of strings:"
            for i in range(args.num_requests)
        ]
        free = SamplingParams(temperature=0.8, seed=0, max_tokens=args.max_tokens, ignore_eos=True)
        held = SamplingParams(
            temperature=0.8,
            seed=0,
            max_tokens=args.max_tokens,
            ignore_eos=True,
            structured_outputs=StructuredOutputsParams(json=SCHEMA),
        )
        for params in (free, held):  # warm-up (the first constrained request builds llguidance's tokenizer)
            run(llm, prompts[:4], params)
        t_free, n_free = run(llm, prompts, free)
        t_held, n_held = run(llm, prompts, held)
        sample = llm.generate(prompts[0], held, use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
    print(f"\n{args.num_requests} requests x {args.max_tokens} tokens, sampled, default model")
    print(f"{'run':<14}{'tokens':>8}{'seconds':>10}{'tok/s':>10}")
    print(f"{'free':<14}{n_free:>8}{t_free:>10.2f}{n_free / t_free:>10.0f}")
    print(f"{'JSON schema':<14}{n_held:>8}{t_held:>10.2f}{n_held / t_held:>10.0f}")
    print(f"constrained / free throughput: {(n_held / t_held) / (n_free / t_free):.2f}")
    print(f"a constrained reply starts: {json.dumps(sample[:70])}")


if __name__ == "__main__":
    main()
