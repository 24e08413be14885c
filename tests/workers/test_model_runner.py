"""The runner's sampling-metadata reuse: the previous step's metadata serves while the same requests
sample in the same order and nothing in it changes per step; anything else rebuilds it."""

from __future__ import annotations

import pytest
import torch

from distgen.frontend.args import EngineArgs
from distgen.sampling_spec import SamplingSpec
from distgen.workers.model_runner import ModelRunner
from distgen.workers.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

GREEDY = SamplingSpec(temperature=0.0, max_tokens=32, ignore_eos=True)


@pytest.fixture
def runner(tiny_model_dir) -> ModelRunner:
    config = EngineArgs(
        model=tiny_model_dir("llama"), dtype="float32", block_size=4, num_gpu_blocks_override=64, device="cpu"
    ).create_config()
    r = ModelRunner(config)
    r.init_kv_cache(64)
    return r


class Driver:
    """Feeds the runner hand-made steps and counts how often it builds sampling metadata."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.builds, self.last = runner, 0, {}
        build = runner._build_sampling_metadata

        def counting(rows):
            self.builds += 1
            return build(rows)

        runner._build_sampling_metadata = counting
        self.next_block = 0
        self.blocks: dict[str, list[int]] = {}
        self.computed: dict[str, int] = {}

    def _alloc(self, n: int) -> list[int]:
        self.next_block += n
        return list(range(self.next_block - n, self.next_block))

    def step(self, new: dict[str, tuple[list[int], SamplingSpec]] = (), finished: list[str] = ()) -> None:
        new = dict(new)
        new_data = []
        for rid, (prompt, params) in new.items():
            self.blocks[rid] = self._alloc(len(prompt) // 4 + 1)
            new_data.append(NewRequestData(rid, prompt, len(prompt), params, self.blocks[rid], 0))
        cached, counts = [], {}
        for rid in [r for r in self.computed if r not in finished]:
            n = self.computed[rid]
            extra = self._alloc(1) if n % 4 == 3 else []
            cached.append(CachedRequestData(rid, [self.last[rid]], extra, n))
            counts[rid] = 1
        for rid in finished:
            del self.computed[rid]
        for rid, (prompt, _) in new.items():
            counts[rid] = len(prompt)
        out = self.runner.execute_model(
            SchedulerOutput(new_data, cached, counts, sum(counts.values()), finished_req_ids=list(finished))
        )
        for rid, tok in zip(out.req_ids, out.sampled_token_ids):
            self.computed[rid] = self.computed.get(rid, 0) + counts[rid]
            self.last[rid] = tok


def test_same_batch_reuses_new_or_finished_request_rebuilds(runner):
    d = Driver(runner)
    d.step({"a": ([5, 6, 7], GREEDY), "b": ([8, 9, 10, 11, 12], GREEDY)})
    for _ in range(5):
        d.step()
    assert d.builds == 1  # the prompts' step and five decode steps: the same rows, in the same order
    d.step({"c": ([13, 14], GREEDY)})
    assert d.builds == 2  # c joined
    d.step()
    assert d.builds == 3  # decodes run shortest context first: c moved to the front
    d.step()
    d.step(finished=["a"])
    assert d.builds == 4  # a left
    d.step()
    assert d.builds == 4


def test_seeded_rows_and_min_tokens_rebuild_every_step(runner):
    d = Driver(runner)
    seeded = SamplingSpec(temperature=0.8, seed=3, max_tokens=32)
    d.step({"a": ([5, 6, 7], GREEDY), "s": ([8, 9], seeded)})
    for _ in range(4):
        d.step()
    assert d.builds == 5  # a seeded row draws from a generator seeded per output position

    d = Driver(runner)
    held = SamplingSpec(temperature=0.0, max_tokens=32, min_tokens=4, stop_token_ids=[1])
    d.step({"m": ([20, 21, 22], held), "n": ([23, 24], GREEDY)})  # m's output 1 (of 4 held)
    for _ in range(6):
        d.step()
    # Outputs 2, 3 and 4 still block the stop id (rebuilt each step); from output 5 on it is reused.
    assert d.builds == 1 + 3 + 1


def test_block_table_rows_follow_joins_growth_preemption_and_exits():
    from distgen.workers.input_batch import RequestStates

    states = RequestStates(max_blocks_per_seq=4)

    def step(new=(), cached=(), finished=()):
        states.apply(SchedulerOutput(list(new), list(cached), {}, 0, finished_req_ids=list(finished)))

    a, b = NewRequestData("a", [1] * 5, 5, GREEDY, [7, 3], 0), NewRequestData("b", [2], 1, GREEDY, [9], 0)
    step(new=[a, b])
    assert states.block_table([states["b"], states["a"]], 3).tolist() == [[9, 0, 0], [7, 3, 0]]
    step(cached=[CachedRequestData("b", [4], [11], 1)])
    assert states.block_table([states["b"]], 4).tolist() == [[9, 11, 0, 0]]
    step(new=[NewRequestData("a", [1] * 5, 5, GREEDY, [5], 0)])  # a back after preemption: new blocks
    assert states.block_table([states["a"]], 4).tolist() == [[5, 0, 0, 0]]
    step(finished=["b"])
    rows = [NewRequestData(f"r{i}", [1], 1, GREEDY, [100 + i], 0) for i in range(70)]
    step(new=rows)  # more requests than the table had rows: it grows, and b's old row comes back clean
    table = states.block_table([states[f"r{i}"] for i in range(70)] + [states["a"]], 2)
    assert table[:, 0].tolist() == [100 + i for i in range(70)] + [5]
    assert not table[:, 1].any()


def test_plain_greedy_sampling_reads_the_logits_in_the_models_dtype(tiny_model_dir):
    """No float32 copy of the logits for plain greedy steps: on a GPU that is a launch and B x V x 6
    bytes of traffic every step (80 us at batch 256 of a 128k vocabulary on an H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    config = EngineArgs(
        model=tiny_model_dir("llama"),
        dtype="bfloat16",
        block_size=4,
        num_gpu_blocks_override=16,
        device="cpu",
    ).create_config()
    runner = ModelRunner(config)
    runner.init_kv_cache(16)
    vocab = config.model.vocab_size
    widened = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape[-1:] == (vocab,):
                widened.append(func.overloadpacket.__name__)
            return out

    step = SchedulerOutput([NewRequestData("a", [5, 6, 7], 3, GREEDY, [0], 0)], [], {"a": 3}, 3)
    with Casts():
        greedy = runner.execute_model(step)
    assert widened == [] and len(greedy.sampled_token_ids) == 1
    # A step that needs float32 (logprobs) still widens them.
    with_lp = SamplingSpec(temperature=0.0, max_tokens=4, logprobs=1)
    step = SchedulerOutput([NewRequestData("b", [5, 6, 7], 3, with_lp, [1], 0)], [], {"b": 3}, 3)
    with Casts():
        assert runner.execute_model(step).sampled_token_ids == greedy.sampled_token_ids
    assert widened


def _slots(cache, runner):
    """The cache as [layers, K/V, blocks, heads, slot, dim] whatever the path's layout (the CPU
    kernels store each K block transposed)."""
    from distgen.kernels.dispatch import attention_path

    if attention_path(runner.device, runner.dtype) != "cpu":
        return cache
    layers, _, blocks, heads, bs, d = cache.shape
    k = cache[:, 0].reshape(layers, blocks, heads, d, bs).transpose(-1, -2)
    return torch.stack([k, cache[:, 1]], 1)


def test_a_cpu_kv_cache_is_born_zero_on_a_mapping_of_its_own(runner):
    """On the CPU the cache is a fresh anonymous mapping: zeros everywhere before any step, even where
    the allocator has just freed memory full of NaN, with no zeroing pass when blocks are handed out."""
    from distgen.workers import heap

    assert not runner._zero_on_first_use and not runner._never_used.any()
    assert (runner.kv_cache == 0).all()
    nbytes = 8 << 20
    poisoned = torch.full((nbytes // 4,), float("nan"))
    del poisoned
    fresh = heap.zeroed_tensor((nbytes // 2 // 64, 64), torch.bfloat16)
    assert fresh.dtype == torch.bfloat16 and fresh.shape == (nbytes // 2 // 64, 64) and (fresh == 0).all()
    fresh[3, 5] = 2.0  # writable, and only where written
    assert fresh.sum().item() == 2.0


def test_a_block_id_past_the_cache_raises_before_any_kernel_writes(runner):
    """A step naming a block outside the cache (a scheduler bug, a hand-made request) is refused with
    the ids, where the CPU kernels would otherwise write past the cache's mapping and crash the rank;
    the runner's requests and cache stay as they were."""
    params = SamplingSpec(temperature=0.0, max_tokens=4)
    before = runner.kv_cache.clone()
    for bad in (64, 10**6, -1):
        step = SchedulerOutput([NewRequestData("x", [5, 6, 7], 3, params, [2, bad], 0)], [], {"x": 3}, 3)
        with pytest.raises(IndexError, match=rf"block ids \[{bad}\] are outside the KV cache's 64 blocks"):
            runner.execute_model(step)
        assert "x" not in runner.states  # refused before the step touched the runner's requests
    assert torch.equal(runner.kv_cache, before)


def test_a_block_is_zeroed_in_every_layer_when_first_handed_out(runner):
    """Fresh device memory may hold NaN, and attention reads whole blocks (masking the slots past a
    sequence's end: 0 x NaN is still NaN). So on a device whose memory is not born zero (a GPU; the CPU
    cache is, see above), a block is zeroed, in all layers at once, the first time a step hands it
    out, and only then. The CPU runner is told to act as such a device here."""
    import math

    runner._zero_on_first_use = True
    runner._never_used[:] = True
    cache = runner.kv_cache
    assert all(
        attn.kv_cache.data_ptr() == cache[i].data_ptr()
        for i, attn in enumerate(runner.model.attention_layers())
    )
    cache.fill_(float("nan"))
    params = SamplingSpec(temperature=0.0, max_tokens=4, logprobs=2)
    step = SchedulerOutput([NewRequestData("a", [5, 6, 7], 3, params, [5], 0)], [], {"a": 3}, 3)
    out = runner.execute_model(step)
    assert all(math.isfinite(lp) for lp in out.logprobs[0])
    assert torch.isnan(cache[:, :, 4]).all() and torch.isnan(cache[:, :, 6]).all()  # not handed out
    assert (_slots(cache, runner)[:, :, 5, :, 3:] == 0).all()  # block 5's unwritten slots, every layer
    # Zeroing happens once per block: a later step zeroes its own fresh block, not block 5 again.
    cache[:, :, 5, :, 3] = 7.0
    step = SchedulerOutput([NewRequestData("b", [8, 9], 2, params, [6], 0)], [], {"b": 2}, 2)
    runner.execute_model(step)
    assert (_slots(cache, runner)[:, :, 6, :, 2:] == 0).all() and (cache[:, :, 5, :, 3] == 7.0).all()
