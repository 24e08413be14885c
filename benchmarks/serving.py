"""Online serving: ``distgen serve`` under concurrent streaming clients, against offline ``LLM.generate``.

The same random workload as ``throughput.py`` (token-id prompts, greedy, ignore EOS, the default model)
runs twice in one invocation: first offline through ``LLM.generate`` (the peer), then through a live
``distgen serve`` subprocess with the same engine flags, driven by ``--max-concurrency`` streaming HTTP
clients that send requests at ``--request-rate`` per second (Poisson arrivals; ``inf`` sends them all at
once, which measures saturation). Reported: request throughput, output tokens/s, time to first token and
inter-token latency (p50/p99, from the client's view), the serve/offline throughput ratio (target >= 0.9:
the process split and HTTP should cost under 10%), and how many server texts equal the offline ones.

Examples::

    .venv/bin/python benchmarks/serving.py                                # 64 requests at saturation
    .venv/bin/python benchmarks/serving.py --request-rate 4 --max-concurrency 16
    .venv/bin/python benchmarks/serving.py --llamacpp-shape --dtype bfloat16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import Request, make_requests, special_token_ids  # noqa: E402

from distgen.executor.ports import free_port

logger = logging.getLogger("benchmarks.serving")


@dataclass
class Timing:
    text: str = ""
    output_tokens: int = 0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


# ------------------------------------------------------------------------------------------- offline


def run_offline(
    engine_kwargs: dict, requests: list[Request], warmup: list[Request]
) -> tuple[float, list[str]]:
    from distgen import LLM, SamplingParams

    llm = LLM(**engine_kwargs)
    try:

        def prompts(reqs):
            return [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]

        def params(reqs):
            return [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True) for r in reqs]

        llm.generate(prompts(warmup), params(warmup), use_tqdm=False)
        t0 = time.perf_counter()
        outs = llm.generate(prompts(requests), params(requests), use_tqdm=False)
        seconds = time.perf_counter() - t0
        return seconds, [o.outputs[0].text for o in outs]
    finally:
        llm.shutdown()


# -------------------------------------------------------------------------------------------- server


def start_server(engine_flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "distgen.entrypoints.cli",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd + engine_flags)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not become healthy within 300 s")


async def one_request(client: httpx.AsyncClient, url: str, req: Request) -> Timing:
    body = {
        "prompt": req.prompt_token_ids,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t = Timing()
    t0 = last = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                t.output_tokens = chunk["usage"]["completion_tokens"]
            if not chunk["choices"]:
                continue
            now = time.perf_counter()
            if t.ttft is None:
                t.ttft = now - t0
            else:
                t.itls.append(now - last)
            last = now
            t.text += chunk["choices"][0]["text"]
    t.latency = time.perf_counter() - t0
    return t


async def run_clients(url: str, requests: list[Request], rate: float, concurrency: int, seed: int):
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=None, limits=limits) as client:

        async def limited(req: Request) -> Timing:
            async with sem:
                return await one_request(client, url, req)

        tasks = []
        t0 = time.perf_counter()
        for req in requests:
            tasks.append(asyncio.create_task(limited(req)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        timings = await asyncio.gather(*tasks)
        return time.perf_counter() - t0, timings


# -------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--min-prompt-len", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=512)
    ap.add_argument("--min-output-len", type=int, default=16)
    ap.add_argument("--max-output-len", type=int, default=256)
    ap.add_argument(
        "--llamacpp-shape", action="store_true", help="64 requests of 32 prompt and 64 new tokens"
    )
    ap.add_argument(
        "--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf: all at once"
    )
    ap.add_argument(
        "--max-concurrency", type=int, default=None, help="clients in flight at most (default: all)"
    )
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--kv-cache-memory", default="1GiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-offline", action="store_true", help="measure the server only")
    args = ap.parse_args(argv)
    if args.llamacpp_shape:
        args.num_requests = 64
        args.min_prompt_len = args.max_prompt_len = 32
        args.min_output_len = args.max_output_len = 64
    args.max_concurrency = args.max_concurrency or args.num_requests
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from distgen.entrypoints.cli import parse_size
    from distgen.model_loader.gguf import default_model_path, read_gguf

    gguf = read_gguf(default_model_path())
    hf_config = gguf.hf_config
    bad = special_token_ids(hf_config, gguf.load_tokenizer())
    vocab = [i for i in range(int(hf_config["vocab_size"])) if i not in bad]
    lengths = ((args.min_prompt_len, args.max_prompt_len), (args.min_output_len, args.max_output_len))
    requests = make_requests(args.num_requests, *lengths, vocab, args.seed)
    warmup = make_requests(2, (16, 16), (4, 4), vocab, args.seed + 1_000_003)
    engine_kwargs = dict(
        dtype=args.dtype, tensor_parallel_size=args.tp, kv_cache_memory=parse_size(args.kv_cache_memory)
    )
    flags = [
        "--dtype",
        args.dtype,
        "--tensor-parallel-size",
        str(args.tp),
        "--kv-cache-memory",
        args.kv_cache_memory,
    ]
    total_out = sum(r.max_tokens for r in requests)

    offline_s, offline_texts = None, None
    if not args.skip_offline:
        logger.info("offline LLM.generate: %d requests", len(requests))
        offline_s, offline_texts = run_offline(engine_kwargs, requests, warmup)
        logger.info("offline: %.2fs", offline_s)

    logger.info("starting distgen serve %s", " ".join(flags))
    proc, url = start_server(flags)
    try:
        asyncio.run(run_clients(url, warmup, float("inf"), 2, args.seed))
        logger.info(
            "serving: %d requests, rate %s, concurrency %d",
            len(requests),
            args.request_rate,
            args.max_concurrency,
        )
        serve_s, timings = asyncio.run(
            run_clients(url, requests, args.request_rate, args.max_concurrency, args.seed)
        )
    finally:
        proc.terminate()
        proc.wait(60)

    out_tokens = sum(t.output_tokens for t in timings)
    if out_tokens != total_out:
        raise SystemExit(f"the server produced {out_tokens} tokens, {total_out} were requested")
    ttfts = [t.ttft for t in timings if t.ttft is not None]
    itls = [x for t in timings for x in t.itls]
    print()
    (p_lo, p_hi), (o_lo, o_hi) = lengths
    print(
        f"workload: {len(requests)} requests, prompts {p_lo}-{p_hi}, outputs {o_lo}-{o_hi} tokens "
        f"({total_out} in all), {args.dtype}, tp={args.tp}, rate={args.request_rate}, "
        f"concurrency={args.max_concurrency}"
    )
    print(f"{'':24}{'seconds':>10}{'req/s':>10}{'out tok/s':>12}")
    rows = [("distgen serve", serve_s)]
    if offline_s is not None:
        rows.insert(0, ("offline LLM.generate", offline_s))
    for name, secs in rows:
        print(f"{name:24}{secs:>10.2f}{len(requests) / secs:>10.2f}{total_out / secs:>12.1f}")
    print(f"TTFT   p50 {percentile(ttfts, 50) * 1e3:8.1f} ms   p99 {percentile(ttfts, 99) * 1e3:8.1f} ms")
    print(f"ITL    p50 {percentile(itls, 50) * 1e3:8.1f} ms   p99 {percentile(itls, 99) * 1e3:8.1f} ms")
    print(f"E2E    mean {statistics.mean(t.latency for t in timings):7.2f} s")
    if offline_s is not None:
        same = sum(t.text == o for t, o in zip(timings, offline_texts))
        note = "(target >= 0.9)" if args.request_rate == float("inf") else "(rate-limited: arrivals bound it)"
        print(f"serve / offline throughput: {offline_s / serve_s:.2f}  {note}")
        print(f"texts equal to offline: {same}/{len(requests)}")


if __name__ == "__main__":
    main()
