"""``distgen bench serve|throughput|latency``: vLLM's benchmark commands, with its flag, dataset and
metric names (the ``random`` dataset; TTFT, TPOT, ITL and E2EL with their mean, median, std and
percentiles; ``--save-result`` JSON with vLLM's keys).

- ``serve`` drives a running OpenAI-compatible server (distgen's or vLLM's) over ``/v1/completions``,
  streaming, ``--num-prompts`` random-token prompts at ``--request-rate`` (Poisson; ``inf``: all at
  once) with at most ``--max-concurrency`` in flight;
- ``throughput`` and ``latency`` run the engine offline (``LLM``) on random prompts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from datetime import datetime
from typing import Any

import numpy as np

from distgen.entrypoints.client_cli import sse_data


def add_bench_command(sub: argparse._SubParsersAction, add_engine_args, model_help: str) -> None:
    bench = sub.add_parser("bench", help="benchmark a server or the engine (as `vllm bench`)")
    kinds = bench.add_subparsers(dest="bench_command", required=True, metavar="{serve,throughput,latency}")
    serve = kinds.add_parser("serve", help="load a running server and measure TTFT, TPOT, ITL, throughput")
    serve.add_argument("--base-url", dest="base_url", default=None, help="default: http://HOST:PORT")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--endpoint", default="/v1/completions")
    serve.add_argument("--model", default=None, help="default: the server's first model")
    serve.add_argument("--request-rate", dest="request_rate", type=float, default=float("inf"))
    serve.add_argument("--max-concurrency", dest="max_concurrency", type=int, default=None)
    serve.add_argument("--ignore-eos", dest="ignore_eos", action="store_true")
    serve.add_argument("--percentile-metrics", dest="percentile_metrics", default="ttft,tpot,itl")
    serve.add_argument("--metric-percentiles", dest="metric_percentiles", default="99")
    serve.add_argument("--save-result", dest="save_result", action="store_true")
    serve.add_argument("--result-dir", dest="result_dir", default=".")
    serve.add_argument("--result-filename", dest="result_filename", default=None)
    _dataset_args(serve)
    serve.add_argument("--seed", type=int, default=0)
    _dataset_args(
        kinds.add_parser("throughput", help="offline throughput of the engine")
    )  # --seed: the engine's
    latency = kinds.add_parser("latency", help="offline latency of one batch")
    latency.add_argument("--input-len", dest="input_len", type=int, default=32)
    latency.add_argument("--output-len", dest="output_len", type=int, default=128)
    latency.add_argument("--batch-size", dest="batch_size", type=int, default=8)
    latency.add_argument("--num-iters-warmup", dest="num_iters_warmup", type=int, default=2)
    latency.add_argument("--num-iters", dest="num_iters", type=int, default=5)
    for p in (kinds.choices["throughput"], latency):
        p.add_argument("--model", default=None, help=model_help)
        add_engine_args(p)


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-name", dest="dataset_name", choices=["random"], default="random")
    p.add_argument("--num-prompts", dest="num_prompts", type=int, default=1000)
    p.add_argument("--random-input-len", dest="random_input_len", type=int, default=1024)
    p.add_argument("--random-output-len", dest="random_output_len", type=int, default=128)
    p.add_argument("--random-range-ratio", dest="random_range_ratio", type=float, default=0.0)


def random_ids(rng: random.Random, n: int, vocab: int = 32000) -> list[int]:
    """``n`` token ids uniform over the vocabulary (capped at 32000), past its first 100, which hold
    most special tokens."""
    return [rng.randrange(100, min(vocab, 32000)) for _ in range(n)]


def random_requests(ns: argparse.Namespace, vocab: int = 32000) -> list[tuple[list[int], int]]:
    """vLLM's random dataset: lengths uniform in [len * (1 - ratio), len * (1 + ratio)], token ids
    from :func:`random_ids`."""
    rng = random.Random(ns.seed)

    def length(n: int) -> int:
        return max(1, rng.randint(int(n * (1 - ns.random_range_ratio)), int(n * (1 + ns.random_range_ratio))))

    return [
        (random_ids(rng, length(ns.random_input_len), vocab), length(ns.random_output_len))
        for _ in range(ns.num_prompts)
    ]


def run_bench(ns: argparse.Namespace, engine_args_from) -> dict[str, Any]:
    if ns.bench_command == "serve":
        return asyncio.run(_serve(ns))
    from distgen import LLM

    llm = LLM(**vars(engine_args_from(ns)))
    try:
        vocab = int(llm.llm_engine.model_config.vocab_size)
        return (_throughput if ns.bench_command == "throughput" else _latency)(llm, ns, vocab)
    finally:
        llm.shutdown()


def _throughput(llm, ns: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from distgen import SamplingParams

    reqs = random_requests(ns, vocab)
    prompts = [{"prompt_token_ids": ids} for ids, _ in reqs]
    params = [SamplingParams(temperature=1.0, top_p=1.0, max_tokens=n, ignore_eos=True) for _, n in reqs]
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    total_in, total_out = sum(len(i) for i, _ in reqs), sum(n for _, n in reqs)
    result = {
        "elapsed_time": elapsed,
        "num_requests": len(reqs),
        "total_num_tokens": total_in + total_out,
        "requests_per_second": len(reqs) / elapsed,
        "tokens_per_second": (total_in + total_out) / elapsed,
        "output_tokens_per_second": total_out / elapsed,
    }
    print(
        f"Throughput: {result['requests_per_second']:.2f} requests/s, {result['tokens_per_second']:.2f} "
        f"total tokens/s, {result['output_tokens_per_second']:.2f} output tokens/s"
    )
    return result


def _latency(llm, ns: argparse.Namespace, vocab: int) -> dict[str, Any]:
    from distgen import SamplingParams

    rng = random.Random(ns.seed)
    prompts = [{"prompt_token_ids": random_ids(rng, ns.input_len, vocab)} for _ in range(ns.batch_size)]
    params = SamplingParams(temperature=1.0, max_tokens=ns.output_len, ignore_eos=True)
    for _ in range(ns.num_iters_warmup):
        llm.generate(prompts, params, use_tqdm=False)
    latencies = []
    for _ in range(ns.num_iters):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        latencies.append(time.perf_counter() - t0)
    result = {"avg_latency": float(np.mean(latencies)), "latencies": latencies}
    result["percentiles"] = {str(p): float(np.percentile(latencies, p)) for p in (10, 25, 50, 75, 90, 99)}
    print(f"Avg latency: {result['avg_latency']:.4f} seconds")
    for p, v in result["percentiles"].items():
        print(f"{p}% percentile latency: {v:.4f} seconds")
    return result


async def _serve(ns: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base = ns.base_url or f"http://{ns.host}:{ns.port}"
    async with httpx.AsyncClient(
        base_url=base, timeout=None, limits=httpx.Limits(max_connections=None)
    ) as client:
        model = ns.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        reqs = random_requests(ns)
        gate = asyncio.Semaphore(ns.max_concurrency or len(reqs))
        rng = np.random.default_rng(ns.seed)
        t0 = time.perf_counter()

        async def one(ids: list[int], n: int) -> dict:
            async with gate:
                return await _one_request(client, ns, model, ids, n)

        tasks = []
        for ids, n in reqs:
            tasks.append(asyncio.create_task(one(ids, n)))
            if ns.request_rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / ns.request_rate))
        outs = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    result = _serve_metrics(ns, model, reqs, outs, duration)
    _print_serve(result, ns)
    if ns.save_result:
        name = (
            ns.result_filename
            or f"distgen-{ns.request_rate}qps-{model.split('/')[-1]}-{datetime.now():%Y%m%d-%H%M%S}.json"
        )
        with open(os.path.join(ns.result_dir, name), "w") as f:
            json.dump(result, f)
    return result


async def _one_request(client, ns: argparse.Namespace, model: str, ids: list[int], n: int) -> dict:
    import httpx

    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": n,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ns.ignore_eos,
    }
    out: dict[str, Any] = {
        "success": False,
        "ttft": 0.0,
        "itl": [],
        "text": "",
        "output_tokens": 0,
        "error": "",
    }
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", ns.endpoint, json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                out["error"] = f"{resp.status_code}: {resp.text[:200]}"
                return out
            async for line in resp.aiter_lines():
                chunk = sse_data(line)
                if chunk is None:
                    continue
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if not out["text"]:
                        out["ttft"] = now - t0
                    else:
                        out["itl"].append(now - last)
                    out["text"] += chunk["choices"][0]["text"]
                    last = now
                if chunk.get("usage"):
                    out["output_tokens"] = chunk["usage"]["completion_tokens"]
        out["latency"] = time.perf_counter() - t0
        out["success"] = True
    except httpx.HTTPError as e:
        out["error"] = str(e)
    return out


def _serve_metrics(ns, model: str, reqs, outs: list[dict], duration: float) -> dict[str, Any]:
    ok = [o for o in outs if o["success"]]
    total_in = sum(len(ids) for (ids, _), o in zip(reqs, outs) if o["success"])
    total_out = sum(o["output_tokens"] for o in ok)
    ttfts = [o["ttft"] for o in ok]
    tpots = [(o["latency"] - o["ttft"]) / (o["output_tokens"] - 1) for o in ok if o["output_tokens"] > 1]
    itls = [x for o in ok for x in o["itl"]]
    e2els = [o["latency"] for o in ok]
    result: dict[str, Any] = {
        "date": f"{datetime.now():%Y%m%d-%H%M%S}",
        "backend": "openai",
        "model_id": model,
        "num_prompts": len(reqs),
        "request_rate": ns.request_rate if ns.request_rate != float("inf") else "inf",
        "max_concurrency": ns.max_concurrency,
        "duration": duration,
        "completed": len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration,
        "output_throughput": total_out / duration,
        "total_token_throughput": (total_in + total_out) / duration,
        "input_lens": [len(ids) for ids, _ in reqs],
        "output_lens": [o["output_tokens"] for o in outs],
        "ttfts": ttfts,
        "itls": [o["itl"] for o in outs],
        "generated_texts": [o["text"] for o in outs],
        "errors": [o["error"] for o in outs],
    }
    percentiles = [float(p) for p in ns.metric_percentiles.split(",")]
    for name, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        ms = [v * 1000 for v in values] or [0.0]
        result[f"mean_{name}_ms"] = float(np.mean(ms))
        result[f"median_{name}_ms"] = float(np.median(ms))
        result[f"std_{name}_ms"] = float(np.std(ms))
        for p in percentiles:
            result[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return result


def _print_serve(r: dict[str, Any], ns) -> None:
    print("{s:{c}^60}".format(s=" Serving Benchmark Result ", c="="))
    rows = [
        ("Successful requests:", r["completed"]),
        ("Benchmark duration (s):", f"{r['duration']:.2f}"),
        ("Total input tokens:", r["total_input_tokens"]),
        ("Total generated tokens:", r["total_output_tokens"]),
        ("Request throughput (req/s):", f"{r['request_throughput']:.2f}"),
        ("Output token throughput (tok/s):", f"{r['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{r['total_token_throughput']:.2f}"),
    ]
    for name in ns.percentile_metrics.split(","):
        rows.append((f"Mean {name.upper()} (ms):", f"{r[f'mean_{name}_ms']:.2f}"))
        rows.append((f"Median {name.upper()} (ms):", f"{r[f'median_{name}_ms']:.2f}"))
        for p in ns.metric_percentiles.split(","):
            rows.append((f"P{p} {name.upper()} (ms):", f"{r[f'p{float(p):g}_{name}_ms']:.2f}"))
    for label, value in rows:
        print(f"{label:<40}{value:>20}")
    print("=" * 60)
