"""The mixture-of-experts grouped GEMM kernel against its torch reference, and the block alignment it
runs over. Runs the Triton kernel in the interpreter on CPU-only machines (``TRITON_INTERPRET=1``, set
before triton is imported); shapes are kept small because the interpreter is slow."""

from __future__ import annotations

import os

import torch  # noqa: E402

if not torch.cuda.is_available():  # on a GPU the kernels must compile and run there, not interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from distgen.kernels import dispatch  # noqa: E402
from distgen.kernels.fused_moe import align_block_size, launch_config  # noqa: E402
from distgen.kernels.reference import fused_moe_ref, moe_route_ref  # noqa: E402
from distgen.layers.fused_moe import FusedMoE  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tokens,top_k,num_experts,block_m", [(7, 2, 4, 16), (1, 2, 8, 16), (40, 3, 5, 4)])
def test_align_block_size_groups_pairs_by_expert_in_whole_blocks(tokens, top_k, num_experts, block_m):
    g = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    ids[ids == num_experts - 1] = 0  # one expert without any pair
    pairs = tokens * top_k
    sorted_ids, block_expert = align_block_size(ids, block_m, num_experts)
    assert sorted_ids.numel() == block_expert.numel() * block_m
    flat = ids.reshape(-1)
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        block = sorted_ids[b * block_m : (b + 1) * block_m].tolist()
        real = [p for p in block if p != pairs]
        if e == num_experts:  # past the last group: padding only
            assert not real
            continue
        assert real and all(flat[p] == e for p in real), (b, e, block)
        assert block[: len(real)] == real  # padding only at a group's end
        seen += real
    assert sorted(seen) == list(range(pairs))
    assert seen == sorted(seen, key=lambda p: int(flat[p]))  # stable: a group keeps the pairs' order
    assert num_experts - 1 not in block_expert.tolist()


def _inputs(tokens, hidden, inter, num_experts, top_k, dtype, seed=0, renormalize=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) * hidden**-0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) * inter**-0.5
    logits = torch.randn(tokens, num_experts, generator=g)
    weights, ids = moe_route_ref(logits, top_k, renormalize)
    to = dict(device=DEVICE, dtype=dtype)
    return x.to(**to), w13.to(**to), w2.to(**to), weights.to(DEVICE), ids.to(DEVICE)


@pytest.mark.parametrize(
    "tokens,hidden,inter,num_experts,top_k",
    [
        (1, 32, 24, 4, 2),  # a decode step: most experts idle
        (9, 48, 23, 4, 2),  # odd intermediate size (an uneven TP slice), K and N not tile multiples
        (64, 32, 16, 2, 2),  # 64 pairs an expert: blocks of 64
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_moe_matches_reference(tokens, hidden, inter, num_experts, top_k, dtype):
    from distgen.kernels.fused_moe import fused_moe

    args = _inputs(tokens, hidden, inter, num_experts, top_k, dtype, seed=tokens)
    got = fused_moe(*args)
    want = fused_moe_ref(*args)
    assert got.dtype == dtype and got.shape == (tokens, hidden)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_block_size_follows_the_pairs_per_expert():
    assert launch_config(8, 8)["BLOCK_M"] == 16
    assert launch_config(128, 2)["BLOCK_M"] == 64


def test_layer_takes_the_kernel_when_triton_is_selected(monkeypatch):
    """Through the dispatch: the layer's Triton path (here in the interpreter) equals its torch path,
    and the Triton path really runs the kernel."""
    from distgen.kernels import fused_moe as kernel_module

    x, w13, w2, _, _ = _inputs(5, 32, 12, 4, 2, torch.float32, seed=3)
    layer = FusedMoE(4, 2, 32, 12, renormalize=False, dtype=torch.float32).to(DEVICE)
    layer.w13_weight.data.copy_(w13)
    layer.w2_weight.data.copy_(w2)
    logits = torch.randn(5, 4, device=DEVICE)
    with dispatch.kernel_mode("torch"):
        want = layer(x, logits)
    launches = []
    real = kernel_module._gemm
    monkeypatch.setattr(kernel_module, "_gemm", lambda *a, **k: launches.append(1) or real(*a, **k))
    with dispatch.kernel_mode("triton"):
        got = layer(x, logits)
    assert len(launches) == 2  # gate/up, then down
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def qwen2_moe_dir(tmp_path_factory) -> str:
    """Tiny Qwen2-MoE (routed and shared experts), saved without a tokenizer."""
    import transformers as tf

    from tests.models.test_moe import moe_config

    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(moe_config("qwen2_moe"), dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("tiny-qwen2-moe-dispatch"))
    model.save_pretrained(path)
    return path


def test_model_steps_match_between_torch_and_triton(qwen2_moe_dir):
    """A MoE model's hand-scheduled steps (prefill chunks, a prefix hit, mixed and decode-only steps)
    give the same tokens and logprobs on the Triton path as on the torch path. On this CPU the kernels
    run in the interpreter; on CUDA the runner's decode steps replay captured CUDA graphs, which the
    expert path must allow (no host sync)."""
    from tests.layers.model_steps import make_runner, run_steps

    with dispatch.kernel_mode("torch"):
        ref = run_steps(make_runner(qwen2_moe_dir, "cpu"))
    if torch.cuda.is_available():
        runner = make_runner(qwen2_moe_dir, "cuda")
        assert runner.graphs is not None
        got = run_steps(runner)
    else:
        with dispatch.kernel_mode("triton"):
            got = run_steps(make_runner(qwen2_moe_dir, "cpu"))
    for i, ((tok, lp), (ref_tok, ref_lp)) in enumerate(zip(got, ref)):
        assert tok == ref_tok, f"step {i}: sampled {tok}, torch path {ref_tok}"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)
