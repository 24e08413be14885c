"""Decode steps replayed from their recordings on the CPU kernels: the same tokens and the same KV cache
as the eager forward at every batch size, one recording per bucket, the padding rows kept to their
spare block, and a forward that cannot replay running eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from distgen.frontend.args import EngineArgs
from distgen.kernels import cpu_build
from distgen.workers import cpu_decode
from distgen.workers.cpu_decode import CpuDecodeReplay, cpu_buckets
from distgen.workers.model_runner import ModelRunner
from tests.conftest import random_prompts
from tests.workers.test_model_runner import GREEDY, Driver

pytestmark = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler to build the kernels")
BLOCKS = 160


def _runner(model_dir: str, eager: bool, dtype: str = "float32", max_num_seqs: int = 256) -> ModelRunner:
    config = EngineArgs(
        model=model_dir,
        dtype=dtype,
        block_size=4,
        num_gpu_blocks_override=BLOCKS,
        device="cpu",
        enforce_eager=eager,
        max_num_seqs=max_num_seqs,
    ).create_config()
    r = ModelRunner(config)
    r.init_kv_cache(BLOCKS)
    return r


def _generate(runner: ModelRunner, batches: list[int], steps: int = 6) -> dict[str, list[int]]:
    """Requests joining in waves of ``batches`` (a prompt step, then ``steps`` decode-only steps each);
    every request's sampled tokens. The cache blocks handed out are ``0 .. runner.blocks_used``."""
    d, prompts = Driver(runner), random_prompts(sum(batches), seed=3, lo=3, hi=14)
    tokens: dict[str, list[int]] = {}
    for wave, n in enumerate(batches):
        new = {f"r{wave}-{i}": (prompts.pop(), GREEDY) for i in range(n)}
        d.step(new)
        for _ in range(steps):
            d.step()
            for rid in d.computed:
                tokens.setdefault(rid, []).append(d.last[rid])
    runner.blocks_used = d.next_block
    return tokens


def test_buckets():
    assert cpu_buckets(256) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert cpu_buckets(5) == [1, 2, 3, 4, 5]
    assert cpu_buckets(1) == [1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_decode_matches_eager(tiny_model_dir, dtype):
    # Waves bring the batch to 1, 6, 11 (bucket 12: one padding row) and 18 sequences (past the
    # largest bucket: eager).
    batches = [1, 5, 5, 7]
    model = tiny_model_dir("llama")
    eager, replay = _runner(model, True, dtype), _runner(model, False, dtype)
    assert eager.graphs is None and isinstance(replay.graphs, CpuDecodeReplay)
    assert _generate(replay, batches) == _generate(eager, batches)
    assert sorted(replay.graphs._recordings) == [1, 6, 12]
    assert all(r is not None for r in replay.graphs._recordings.values())
    # The padding rows wrote only to the spare block: every request's cache is the eager one's.
    used = replay.blocks_used
    assert used == eager.blocks_used and used < BLOCKS
    assert torch.equal(replay.kv_cache[:, :, :used], eager.kv_cache[:, :, :used])


def test_each_bucket_is_recorded_once(tiny_model_dir, monkeypatch):
    calls = []
    record = cpu_decode.record

    def counting(fn):
        calls.append(1)
        return record(fn)

    monkeypatch.setattr(cpu_decode, "record", counting)
    runner = _runner(tiny_model_dir("llama-gqa3"), False, max_num_seqs=3)
    assert runner.graphs.buckets == [1, 2, 3]
    _generate(runner, [2, 1], steps=5)  # 2 rows, then 3
    assert len(calls) == 2 and sorted(runner.graphs._recordings) == [2, 3]


def test_a_forward_that_cannot_replay_runs_eagerly(tiny_model_dir, caplog):
    eager, replay = _runner(tiny_model_dir("llama"), True), _runner(tiny_model_dir("llama"), False)

    def reads_a_value(module, args, out) -> None:  # a forward whose Python reads a tensor's value
        assert out[0].abs().sum().item() > 0

    for r in (eager, replay):
        r.model.layers[0].register_forward_hook(reads_a_value)
    with caplog.at_level(logging.INFO, logger="distgen"):
        assert _generate(replay, [2, 2]) == _generate(eager, [2, 2])
    assert sorted(replay.graphs._recordings) == [2, 4]
    assert all(r is None for r in replay.graphs._recordings.values())
    told = [m for m in caplog.messages if "run eagerly" in m]
    assert len(told) == 1 and "aten.item" in told[0]
