"""``distgen run-batch -i IN.jsonl -o OUT.jsonl --model M``: OpenAI's batch file format, run offline, as
``vllm run-batch`` does. Each input line is ``{"custom_id", "method": "POST", "url", "body"}`` for
``/v1/chat/completions`` or ``/v1/completions``; each output line, in input order, is
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``. The requests go
through the server's own app in this process (no socket), so a batch answers exactly as ``distgen
serve`` would, errors included; they run concurrently, batched by the engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import uuid
from typing import Any

logger = logging.getLogger("distgen")
URLS = ("/v1/chat/completions", "/v1/completions")


def add_run_batch_command(sub: argparse._SubParsersAction, add_engine_args, model_help: str) -> None:
    p = sub.add_parser(
        "run-batch",
        help="run an OpenAI batch file (JSONL) offline (as `vllm run-batch`)",
        description="Run every request of an OpenAI batch input file and write the batch output file.",
    )
    p.add_argument("-i", "--input-file", dest="input_file", required=True, help="the batch input (JSONL)")
    p.add_argument("-o", "--output-file", dest="output_file", required=True, help="where the results go")
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--config", metavar="YAML", help="defaults for any flag below, read from a YAML file")
    p.add_argument(
        "--max-concurrency", dest="max_concurrency", type=int, default=256, help="requests in flight at once"
    )
    add_engine_args(p)


def run_batch(engine_args, input_file: str, output_file: str, max_concurrency: int = 256) -> dict[str, int]:
    """Run the file; returns how many lines succeeded and failed."""
    with open(input_file, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    results = asyncio.run(_run(engine_args, lines, max_concurrency))
    with open(output_file, "w", encoding="utf-8") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    ok = sum(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    logger.info("run-batch: %d of %d requests succeeded; results in %s", ok, len(results), output_file)
    return {"succeeded": ok, "failed": len(results) - ok}


async def _run(engine_args, lines: list[str], max_concurrency: int) -> list[dict[str, Any]]:
    import httpx
    from tqdm import tqdm

    from distgen.entrypoints.openai.api_server import ServerArgs, build_app
    from distgen.frontend.async_llm import AsyncLLM

    engine = AsyncLLM.from_engine_args(engine_args)
    try:
        app = build_app(engine, ServerArgs(), [engine.config.model.served_model_name])
        transport = httpx.ASGITransport(app=app)
        gate = asyncio.Semaphore(max(1, max_concurrency))
        bar = tqdm(total=len(lines), desc="run-batch", unit="req")
        client = httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None)
        async with client:

            async def one(line: str) -> dict[str, Any]:
                async with gate:
                    result = await _request(client, line)
                bar.update(1)
                return result

            results = await asyncio.gather(*(one(line) for line in lines))
        bar.close()
        return list(results)
    finally:
        engine.shutdown()


async def _request(client, line: str) -> dict[str, Any]:
    out: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": None, "response": None}
    try:
        item = json.loads(line)
        if not isinstance(item, dict):
            raise ValueError("a line must be a JSON object")
        out["custom_id"] = item.get("custom_id")
        url, body = item.get("url"), item.get("body")
        if item.get("method", "POST") != "POST" or url not in URLS:
            took = " or ".join(URLS)
            raise ValueError(f"method {item.get('method')!r} url {url!r}: run-batch takes POST {took}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
    except ValueError as e:  # json.JSONDecodeError is one
        out["error"] = {"code": "invalid_request", "message": str(e)}
        return out
    resp = await client.post(url, json={**body, "stream": False})
    data = resp.json()
    out["response"] = {"status_code": resp.status_code, "request_id": data.get("id", out["id"]), "body": data}
    out["error"] = None
    return out
