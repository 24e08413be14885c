"""``AsyncLLM.end_all``: what a stopping server does to the requests still in flight."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from distgen import SamplingParams
from distgen.exceptions import EngineDeadError
from distgen.frontend.args import EngineArgs
from distgen.frontend.async_llm import AsyncLLM

LONG = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)


def test_end_all_ends_every_request_in_flight_and_the_engine_serves_on(tiny_model_dir):
    engine = AsyncLLM.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), kv_cache_memory=16 << 20))
    running: list[int] = []  # the engine core's running requests, step by step
    engine.stat_loggers.append(
        SimpleNamespace(record=lambda sched, it: sched is not None and running.append(sched.num_running))
    )

    async def consume(request_id: str, seen: list[int]) -> None:
        async for out in engine.generate({"prompt_token_ids": [5, 6, 7]}, LONG, request_id):
            seen.append(len(out.outputs[0].token_ids))

    async def main() -> None:
        seen: dict[str, list[int]] = {"a": [], "b": []}
        tasks = [asyncio.create_task(consume(rid, seen[rid])) for rid in seen]
        while not all(seen.values()):  # both are generating
            await asyncio.sleep(0.01)
        assert engine.end_all(EngineDeadError("the server is shutting down")) == 2
        for task in tasks:
            with pytest.raises(EngineDeadError, match="the server is shutting down"):
                await task
        assert all(0 < sum(s) < LONG.max_tokens for s in seen.values())  # deltas: tokens per step
        assert engine.num_in_flight == 0 and engine.end_all(EngineDeadError("again")) == 0
        # The requests were aborted in the engine core too: the next one never runs beside them
        # (a step already under way when they were ended may still report them).
        running.clear()
        short = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        outs = [o async for o in engine.generate({"prompt_token_ids": [5, 6, 7]}, short, "c")]
        assert outs[-1].finished and sum(len(o.outputs[0].token_ids) for o in outs) == 3
        assert running and max(running) < 3, running

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
