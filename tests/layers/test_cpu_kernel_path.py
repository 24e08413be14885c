"""The CPU fast path (weights packed for the CPU GEMM, the CPU kernels) against the plain-torch reference on
tiny models of every architecture: the same greedy tokens and logprobs over hand-scheduled steps
that cover fresh prefills of several sequences, a chunked prefill continuing after its cached first
chunk, a prefix-cache hit, decodes mixed with a prefill, and decode-only steps."""

from __future__ import annotations

import pytest
import torch

from distgen.kernels import cpu_build, dispatch
from distgen.layers.linear import LinearBase
from tests.layers.model_steps import make_runner, run_steps

pytestmark = pytest.mark.skipif(cpu_build.try_load() is None, reason="no C++ compiler to build the kernels")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "opt"])
def test_cpu_kernels_match_the_torch_path(arch, tokenizerless_dir):
    with dispatch.kernel_mode("torch"):
        ref_runner = make_runner(tokenizerless_dir(arch), "cpu")
        ref = run_steps(ref_runner)
    runner = make_runner(tokenizerless_dir(arch), "cpu")  # auto: the CPU kernels
    packed = [m for m in runner.model.modules() if isinstance(m, LinearBase)]
    assert packed and all(m.packed is not None and m.weight.numel() == 0 for m in packed)
    assert all(m.packed is None for m in ref_runner.model.modules() if isinstance(m, LinearBase))
    got = run_steps(runner)
    assert len(got) == len(ref) == 5
    for i, ((tok, lp), (ref_tok, ref_lp)) in enumerate(zip(got, ref)):
        assert tok == ref_tok, f"step {i}: sampled {tok}, torch path {ref_tok}"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


def test_bfloat16_cpu_kernels_stay_within_the_reference_top5(tokenizerless_dir):
    """bf16 rounds differently between the paths (fused ops round once where torch rounds per op):
    each sampled token must be among the torch path's top logprobs (DESIGN.md's rule)."""
    outputs: dict[str, list] = {"ref": [], "got": []}

    def recorded(runner, key):
        step = runner.execute_model
        runner.execute_model = lambda sched: outputs[key].append(step(sched)) or outputs[key][-1]
        return runner

    with dispatch.kernel_mode("torch"):
        run_steps(recorded(make_runner(tokenizerless_dir("llama"), "cpu", dtype="bfloat16"), "ref"))
    runner = recorded(make_runner(tokenizerless_dir("llama"), "cpu", dtype="bfloat16"), "got")
    assert runner.kv_cache.dtype == torch.bfloat16
    run_steps(runner)
    same = 0
    for got, ref in zip(outputs["got"], outputs["ref"]):
        assert got.req_ids == ref.req_ids
        for tok, ref_tok, top in zip(got.sampled_token_ids, ref.sampled_token_ids, ref.logprob_token_ids):
            assert tok in top, f"sampled {tok}, outside the torch path's top tokens {top}"
            same += tok == ref_tok
        if got.sampled_token_ids != ref.sampled_token_ids:
            break  # each runner goes on with its own tokens: later steps are no longer comparable
    assert same >= 1


def test_forced_cpu_mode_fails_clearly_without_a_compiler(monkeypatch):
    monkeypatch.setattr(
        cpu_build, "_attempt", lambda: cpu_build.CpuKernelsUnavailable("no C++ compiler found")
    )
    with dispatch.kernel_mode("cpu"), pytest.raises(cpu_build.CpuKernelsUnavailable, match="no C"):
        dispatch.use_cpu_kernels_for(torch.device("cpu"), torch.float32)
    assert dispatch.attention_path(torch.device("cpu"), torch.float32) == "torch"  # auto falls back
