"""Offline batch generation on a Ray cluster: one JSON line in, one JSON line out per prompt.

The tensor-parallel ranks are Ray actors placed by distgen's ``ray`` executor (one GPU each on GPU
nodes, one CPU each otherwise); this script is the driver. Run it as a Ray job (RAY_ADDRESS is set for
it) or on any node of a running cluster (``address="auto"`` finds it)::

    ray job submit --working-dir . -- python launch/offline_batch.py /models/m --tp 4 \\
        --input prompts.jsonl --output /shared/out.jsonl
    python launch/offline_batch.py /models/m --tp 2 --input prompts.txt     # on a cluster node

Input: a ``.jsonl`` file of ``{"prompt": "..."}`` (or ``{"messages": [...]}`` for chat) objects, or a
text file of one prompt per line. Output (stdout when ``--output`` is not given): one object per input
line, in order, with ``prompt``, ``text``, ``token_ids`` and ``finish_reason``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time


def read_inputs(path: str) -> list[dict]:
    with open(path) as f:
        lines = [ln.rstrip("\n") for ln in f if ln.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(ln) for ln in lines]
    return [{"prompt": ln} for ln in lines]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Offline batch generation with distgen on a Ray cluster.")
    ap.add_argument("model", nargs="?", default=None, help="HF directory or .gguf file (default: SmolLM2)")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size: Ray actors, one per rank")
    ap.add_argument("--pp", type=int, default=1, help="pipeline_parallel_size: stages of --tp actors each")
    ap.add_argument("--dp", type=int, default=1, help="data_parallel_size: engine replicas, --tp ranks each")
    ap.add_argument("--input", required=True, help=".jsonl ({'prompt'} or {'messages'}) or a text file")
    ap.add_argument("--output", default=None, help="where to write the JSON lines (default: stdout)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from distgen import LLM, SamplingParams

    items = read_inputs(args.input)
    llm = LLM(
        args.model,
        tensor_parallel_size=args.tp,
        pipeline_parallel_size=args.pp,
        data_parallel_size=args.dp,
        distributed_executor_backend="ray",
        max_model_len=args.max_model_len,
        seed=args.seed,
    )
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed
    )
    t0 = time.perf_counter()
    chats = [i for i, it in enumerate(items) if "messages" in it]
    plain = [i for i, it in enumerate(items) if "messages" not in it]
    results: dict[int, object] = {}
    if plain:
        outs = llm.generate([items[i]["prompt"] for i in plain], params, use_tqdm=False)
        results.update(zip(plain, outs))
    if chats:
        outs = llm.chat([items[i]["messages"] for i in chats], params, use_tqdm=False)
        results.update(zip(chats, outs))
    seconds = time.perf_counter() - t0
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        tokens = 0
        for i, item in enumerate(items):
            c = results[i].outputs[0]
            tokens += len(c.token_ids)
            row = {"prompt": item.get("prompt", item.get("messages")), "text": c.text}
            row.update(token_ids=list(c.token_ids), finish_reason=c.finish_reason)
            out.write(json.dumps(row) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    logging.getLogger("distgen").info(
        "%d prompts, %d tokens in %.1fs (%.1f tok/s)", len(items), tokens, seconds, tokens / seconds
    )
    llm.shutdown()


if __name__ == "__main__":
    main()
