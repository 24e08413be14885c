"""Hand-scheduled model-runner steps on tiny random models, shared by the tests that compare one
kernel path with another (Triton, the CPU kernels, the plain-torch reference)."""

from __future__ import annotations

import torch

from distgen.frontend.args import EngineArgs
from distgen.sampling_spec import SamplingSpec
from distgen.workers.model_runner import ModelRunner
from distgen.workers.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tests.conftest import _tiny_config


def save_tiny(tmp_path_factory, arch: str) -> str:
    """A tiny random model saved without a tokenizer: the runner needs none, and the GPU machine, where
    these tests also run, has no default model to take one from."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
    path = str(tmp_path_factory.mktemp(f"tiny-{arch}-dispatch"))
    model.save_pretrained(path)
    return path


GREEDY = SamplingSpec(temperature=0.0, max_tokens=8, logprobs=3, ignore_eos=True)
A = [11, 523, 97, 4410, 18, 2044, 305, 77, 6001, 12]  # 10 tokens, prefilled in chunks of 6 + 4
B = [700, 31, 9]
C = A[:8] + [40, 41]  # shares A's first two blocks (block size 4): a prefix-cache hit


def run_steps(runner: ModelRunner, ahead: bool = False) -> list[tuple[list[int], list[list[float]]]]:
    """Run five hand-scheduled steps; return each step's sampled tokens and top logprobs.

    Block 0 is handed out first, as the block pool does: the torch path pads block tables with it.
    With ``ahead`` the steps come as under async scheduling: a token reaches the runner's diff one
    step late, so the step right after a sample reads it from a placeholder.
    """
    results = []
    sampled: list[dict[str, int]] = []

    def step(new, cached, counts):
        out = runner.execute_model(SchedulerOutput(new, cached, counts, sum(counts.values())))
        assert out is not None
        sampled.append(dict(zip(out.req_ids, out.sampled_token_ids)))
        results.append((out.sampled_token_ids, out.logprobs))
        return sampled[-1]

    def new_tokens(rid: str) -> list[int]:
        """What the scheduler's diff for the next step says ``rid`` sampled since the last one."""
        k = len(sampled) - (2 if ahead else 1)
        return [sampled[k][rid]] if k >= 0 and rid in sampled[k] else []

    s1 = step(
        [NewRequestData("a", A, 10, GREEDY, [3, 7, 1], 0), NewRequestData("b", B, 3, GREEDY, [0], 0)],
        [],
        {"a": 6, "b": 3},
    )
    assert list(s1) == ["b"]  # a's prompt is not finished yet
    step(
        [],
        [CachedRequestData("a", [], [], 6), CachedRequestData("b", new_tokens("b"), [], 3)],
        {"a": 4, "b": 1},
    )
    step(
        [NewRequestData("c", C, 10, GREEDY, [3, 7, 11], 8)],
        [CachedRequestData("a", new_tokens("a"), [], 10), CachedRequestData("b", new_tokens("b"), [9], 4)],
        {"a": 1, "b": 1, "c": 2},
    )
    step(
        [],
        [
            CachedRequestData("a", new_tokens("a"), [12], 11),
            CachedRequestData("b", new_tokens("b"), [], 5),
            CachedRequestData("c", new_tokens("c"), [], 10),
        ],
        {"a": 1, "b": 1, "c": 1},
    )
    step(
        [],
        [
            CachedRequestData("a", new_tokens("a"), [], 12),
            CachedRequestData("b", new_tokens("b"), [], 6),
            CachedRequestData("c", new_tokens("c"), [2], 11),
        ],
        {"a": 1, "b": 1, "c": 1},
    )
    return results


def make_runner(path: str, device: str, dtype: str = "float32", **engine_args) -> ModelRunner:
    config = EngineArgs(
        model=path, dtype=dtype, block_size=4, num_gpu_blocks_override=16, device=device, **engine_args
    ).create_config()
    runner = ModelRunner(config)
    runner.init_kv_cache(16)
    return runner
