"""Decode steps replayed from their recordings on the CPU kernels: the same tokens and the same KV cache
as the eager forward at every batch size, a size recorded when it comes back, the recent recordings
kept, each holding little memory, and a forward that cannot replay running eagerly."""

from __future__ import annotations

import logging

import pytest
import torch

from distgen.frontend.args import EngineArgs
from distgen.kernels import cpu_build
from distgen.workers import cpu_decode
from distgen.workers.cpu_decode import CpuDecodeReplay
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


def _generate(runner: ModelRunner, batches: list[int], steps: int | list[int] = 6) -> dict[str, list[int]]:
    """Requests joining in waves of ``batches`` (a prompt step, then ``steps`` decode-only steps each);
    every request's sampled tokens. The cache blocks handed out are ``0 .. runner.blocks_used``."""
    d, prompts = Driver(runner), random_prompts(sum(batches), seed=3, lo=3, hi=14)
    tokens: dict[str, list[int]] = {}
    steps = steps if isinstance(steps, list) else [steps] * len(batches)
    for wave, (n, decodes) in enumerate(zip(batches, steps)):
        new = {f"r{wave}-{i}": (prompts.pop(), GREEDY) for i in range(n)}
        d.step(new)
        for _ in range(decodes):
            d.step()
            for rid in d.computed:
                tokens.setdefault(rid, []).append(d.last[rid])
    runner.blocks_used = d.next_block
    return tokens


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_decode_matches_eager(tiny_model_dir, dtype):
    batches = [1, 5, 5, 7]  # decode batches of 1, 6, 11 and 18 sequences
    model = tiny_model_dir("llama")
    eager, replay = _runner(model, True, dtype), _runner(model, False, dtype)
    assert eager.graphs is None and isinstance(replay.graphs, CpuDecodeReplay)
    assert _generate(replay, batches) == _generate(eager, batches)
    assert sorted(replay.graphs._recordings) == [1, 6, 11, 18]
    used = replay.blocks_used
    assert used == eager.blocks_used and used < BLOCKS
    assert torch.equal(replay.kv_cache[:, :, :used], eager.kv_cache[:, :, :used])


def test_a_size_is_recorded_when_it_comes_back_and_the_recent_ones_are_kept(tiny_model_dir, monkeypatch):
    calls = []
    record = cpu_decode.record

    def counting(fn):
        calls.append(1)
        return record(fn)

    monkeypatch.setattr(cpu_decode, "record", counting)
    monkeypatch.setattr(cpu_decode, "KEPT", 2)
    runner = _runner(tiny_model_dir("llama-gqa3"), False)
    # One decode step of 2 sequences (not recorded), then four steps each of 3, 4 and 5 (each recorded
    # on its second step, then replayed).
    _generate(runner, [2, 1, 1, 1], steps=[1, 4, 4, 4])
    assert len(calls) == 3
    assert list(runner.graphs._recordings) == [4, 5]  # 3 made way for them


def test_a_recordings_memory_does_not_grow_with_the_layers(tiny_model_dir):
    held = {}
    for arch in ("llama", "llama-4l"):  # the same model with 2 and 4 layers
        runner = _runner(tiny_model_dir(arch), False)
        _generate(runner, [12], steps=3)
        rec = runner.graphs._recordings[12]
        held[len(runner.model.layers)] = sum(s.nbytes() for s in rec.memory)
    assert held[4] == held[2]  # each layer's activations reuse the last one's memory
    assert held[2] < 8 * 12 * runner.hidden_size * 4  # a few float32 activations of the batch


def test_a_forward_that_cannot_replay_runs_eagerly(tiny_model_dir, caplog):
    eager, replay = _runner(tiny_model_dir("llama"), True), _runner(tiny_model_dir("llama"), False)

    def reads_a_value(module, args, out) -> None:  # a forward whose Python reads a tensor's value
        assert out[0].abs().sum().item() > 0

    for r in (eager, replay):
        r.model.layers[0].register_forward_hook(reads_a_value)
    with caplog.at_level(logging.INFO, logger="distgen"):
        assert _generate(replay, [2, 2]) == _generate(eager, [2, 2])
    assert not replay.graphs._recordings and "aten.item" in replay.graphs.eager_reason
    told = [m for m in caplog.messages if "run eagerly" in m]
    assert len(told) == 1 and "aten.item" in told[0]
