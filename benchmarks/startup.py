"""Time from a fresh Python process to the first generated token, distgen against transformers.

Both start from the same GGUF file (the default model unless ``--model``) in a new interpreter, and
each run is timed from before the first import to after one generated token:

- distgen: ``LLM(model)`` (the engine core in its own process, as always) and ``generate`` of 1 token;
- transformers (the peer): ``AutoTokenizer`` and ``AutoModelForCausalLM.from_pretrained(gguf_file=...)``
  and ``generate`` of 1 token. transformers refuses GGUF files unless ``accelerate`` is installed; that
  check guards nothing on the CPU path, so it is lifted here (as in tests/model_loader/test_gguf.py).

Runs alternate between the two, best of ``--runs``. distgen caches the tokenizer it converts from a
GGUF file (under ``~/.cache/distgen``), so its runs after the first are the ones users see; the first
(cold) run is printed too.

    .venv/bin/python benchmarks/startup.py [--model FILE.gguf] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

DISTGEN = """
import sys
from distgen import LLM, SamplingParams
llm = LLM(sys.argv[1])
out = llm.generate("Hello", SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 1
"""

HF = """
import os, sys
import torch
import transformers.modeling_utils as modeling_utils
from transformers import AutoModelForCausalLM, AutoTokenizer
modeling_utils.is_accelerate_available = lambda: True
directory, filename = os.path.split(sys.argv[1])
tok = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, dtype=torch.float32).eval()
ids = tok("Hello", return_tensors="pt").input_ids
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
assert out.shape[1] == ids.shape[1] + 1
"""


def timed(script: str, model: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script, model], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"run failed:\n{proc.stderr[-3000:]}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file (default: the default model)")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    if args.model is None:
        from distgen.model_loader.gguf import default_model_path

        args.model = default_model_path()
    print(f"model {os.path.basename(args.model)}, {os.cpu_count()} CPUs, best of {args.runs}", flush=True)
    first = timed(DISTGEN, args.model)
    print(f"  distgen first run (may convert and cache the tokenizer): {first:.2f} s", flush=True)
    runs: dict[str, list[float]] = {"distgen": [], "transformers": []}
    for _ in range(args.runs):
        for name, script in (("distgen", DISTGEN), ("transformers", HF)):
            runs[name].append(timed(script, args.model))
            print(f"  {name:<12} {runs[name][-1]:.2f} s", flush=True)
    ours, theirs = min(runs["distgen"]), min(runs["transformers"])
    print("\n| process start to first token | seconds (best) |")
    print("|---|---|")
    print(f"| distgen `LLM()` + generate | {ours:.2f} |")
    print(f"| transformers from_pretrained(gguf_file) + generate | {theirs:.2f} |")
    print(f"\ndistgen / transformers: {ours / theirs:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
