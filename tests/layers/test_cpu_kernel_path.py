"""The CPU fast path (weights packed for the CPU GEMM, the CPU kernels) against the plain-torch reference on
tiny models of every architecture: the same greedy tokens and logprobs over hand-scheduled steps
that cover fresh prefills of several sequences, a chunked prefill continuing after its cached first
chunk, a prefix-cache hit, decodes mixed with a prefill, and decode-only steps."""

from __future__ import annotations

import pytest
import torch

from distgen.kernels import cpu_build, dispatch
from distgen.layers.linear import LinearBase, MergedColumnParallelLinear
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
    # The gated MLPs' gate/up projections take the GEMM with SiLU-and-mul in its epilogue.
    gate_ups = [m for m in packed if isinstance(m, MergedColumnParallelLinear)]
    assert len(gate_ups) == (0 if arch == "opt" else 2) and all(m.packed.gate_up for m in gate_ups)
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


@pytest.mark.parametrize("arch, mode", [("llama", "cpu"), ("qwen3", "cpu"), ("llama", "torch")])
def test_the_last_layer_carries_only_the_sampling_rows(arch, mode, tokenizerless_dir):
    """run_steps' prefill chunks have rows that do not sample: the last layer carries only the rows
    that do past its attention, and the tokens and logprobs are those of a forward over every row (bit
    for bit on the CPU kernels, whose GEMM rows are sums of their own)."""
    with dispatch.kernel_mode(mode):
        full = make_runner(tokenizerless_dir(arch), "cpu")
        full.model.keeps_rows = False
        want = run_steps(full)
        runner = make_runner(tokenizerless_dir(arch), "cpu")
        kept: list[int | None] = []
        forward = runner.model.forward

        def recording(*args, keep=None):
            kept.append(None if keep is None else len(keep))
            return forward(*args, keep=keep)

        runner.model.forward = recording
        got = run_steps(runner)
    # Steps 1-3 hold prefill rows (1 of 9, 2 of 5 and 3 of 4 rows sample); steps 4-5 are decodes.
    assert kept == [1, 2, 3, None, None]
    for (tok, lp), (want_tok, want_lp) in zip(got, want, strict=True):
        assert tok == want_tok
        if mode == "cpu":
            assert lp == want_lp
        else:  # the BLAS may block a GEMM of fewer rows differently
            torch.testing.assert_close(torch.tensor(lp), torch.tensor(want_lp), atol=1e-5, rtol=1e-5)
