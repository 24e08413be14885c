"""The mixture-of-experts layer: routing as transformers' routers compute it, the grouped expert
computation against a naive per-token loop, the TP ranks' slices summing to the whole (uneven splits
included) with one all-reduce per layer, Qwen2-MoE's shared expert, and bad configurations refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distgen.distributed import parallel_state as ps
from distgen.kernels import dispatch
from distgen.kernels.reference import moe_route_ref
from distgen.layers.fused_moe import FusedMoE, SparseMoeBlock

H = 32


def expert_weights(num_experts: int, inter: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """(gate [I, H], up [I, H], down [H, I]) of each expert, as a checkpoint stores them."""
    g = torch.Generator().manual_seed(seed)
    return [
        tuple(torch.randn(*shape, generator=g) * 0.3 for shape in ((inter, H), (inter, H), (H, inter)))
        for _ in range(num_experts)
    ]


def load(layer: FusedMoE, experts: list[tuple[torch.Tensor, ...]]) -> FusedMoE:
    for e, (gate, up, down) in enumerate(experts):
        layer.weight_loader(layer.w13_weight, gate, ("gate", e))
        layer.weight_loader(layer.w13_weight, up, ("up", e))
        layer.weight_loader(layer.w2_weight, down, ("down", e))
    assert layer.loaded_params() == {"w13_weight", "w2_weight"}
    return layer


def naive_moe(x, logits, experts, top_k: int, renormalize: bool) -> torch.Tensor:
    """One token at a time, one chosen expert at a time."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        probs = torch.softmax(logits[t], dim=-1)
        w, ids = torch.topk(probs, top_k)
        if renormalize:
            w = w / w.sum()
        for weight, e in zip(w.tolist(), ids.tolist()):
            gate, up, down = experts[e]
            out[t] += weight * (F.silu(gate @ x[t]) * (up @ x[t])) @ down.T
    return out


@pytest.fixture
def tp_group(monkeypatch):
    """``tp_group(rank, size)`` makes the layers built next see that TP rank; all-reduces are counted
    and leave each rank's partial as it is, so tests can sum them."""
    calls: list[tuple[int, ...]] = []

    def fake_all_reduce(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x

    monkeypatch.setattr(ps, "all_reduce", fake_all_reduce)

    def set_rank(rank: int, size: int) -> list[tuple[int, ...]]:
        monkeypatch.setitem(ps._STATE, "tp", ps._TPGroup(rank, size, None))
        return calls

    return set_rank


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 4, 2), (13, 8, 2), (9, 6, 3), (5, 4, 4)])
def test_grouped_experts_match_a_naive_per_token_loop(tokens, num_experts, top_k, renormalize):
    torch.manual_seed(tokens)
    experts = expert_weights(num_experts, 24, seed=tokens)
    layer = load(FusedMoE(num_experts, top_k, H, 24, renormalize, torch.float32), experts)
    x = torch.randn(tokens, H)
    logits = torch.randn(tokens, num_experts) * 2
    want = naive_moe(x, logits, experts, top_k, renormalize)
    torch.testing.assert_close(layer(x, logits), want, rtol=1e-5, atol=1e-5)


def test_renormalisation_changes_the_result():
    """The switch is honoured: without renormalisation the top-2 weights sum to less than one."""
    w_on, ids_on = moe_route_ref(torch.tensor([[2.0, 1.0, 0.5, 0.0]]), 2, True)
    w_off, ids_off = moe_route_ref(torch.tensor([[2.0, 1.0, 0.5, 0.0]]), 2, False)
    assert torch.equal(ids_on, ids_off) and ids_on.tolist() == [[0, 1]]
    torch.testing.assert_close(w_on.sum(), torch.tensor(1.0))
    assert w_off.sum() < 0.9
    torch.testing.assert_close(w_on, w_off / w_off.sum())


@pytest.mark.parametrize("arch,norm", [("mixtral", True), ("qwen2_moe", False), ("qwen2_moe", True)])
def test_routing_matches_transformers_routers(arch, norm):
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    kw = dict(hidden_size=H, num_experts_per_tok=2)
    if arch == "mixtral":
        router = MixtralTopKRouter(tf.MixtralConfig(**kw, num_local_experts=8))
    else:
        router = Qwen2MoeTopKRouter(tf.Qwen2MoeConfig(**kw, num_experts=8, norm_topk_prob=norm))
    torch.manual_seed(1)
    router.weight.data.normal_()
    x = torch.randn(11, H)
    _, hf_w, hf_ids = router(x)
    w, ids = moe_route_ref(F.linear(x, router.weight), 2, norm)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(w, hf_w, rtol=0, atol=0)


@pytest.mark.parametrize("inter,tp", [(24, 2), (37, 2), (37, 3), (5, 5)])
def test_tp_ranks_partials_sum_to_the_whole(inter, tp, tp_group):
    """Each rank holds rows ``split_range(I)`` of every expert; the partials of the ranks add up to the
    unsharded layer's output, with one all-reduce per rank's forward."""
    experts = expert_weights(4, inter, seed=inter)
    x, logits = torch.randn(7, H), torch.randn(7, 4)
    tp_group(0, 1)
    want = load(FusedMoE(4, 2, H, inter, True, torch.float32), experts)(x, logits)
    total = torch.zeros_like(want)
    for rank in range(tp):
        calls = tp_group(rank, tp)
        layer = load(FusedMoE(4, 2, H, inter, True, torch.float32), experts)
        start, n = ps.split_range(inter, tp, rank)
        assert layer.w13_weight.shape == (4, 2 * n, H) and layer.w2_weight.shape == (4, H, n)
        assert torch.equal(layer.w13_weight[1, n:], experts[1][1][start : start + n])  # up rows
        before = len(calls)
        total += layer(x, logits)
        assert len(calls) == before + 1
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", [1, 2])
def test_shared_expert_block_matches_transformers(tp, tp_group):
    """Qwen2-MoE's block (routed experts + sigmoid-gated shared expert) from transformers' in-memory
    weights (the fused expert layout), summed over the ranks' partials after their one all-reduce."""
    import transformers as tf
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = tf.Qwen2MoeConfig(
        hidden_size=H, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=21,
        shared_expert_intermediate_size=30, norm_topk_prob=False, experts_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(2)
    hf = Qwen2MoeSparseMoeBlock(cfg)
    for p in hf.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(6, H)
    with torch.no_grad():
        want = hf(x[None])[0]
    total = torch.zeros_like(want)
    for rank in range(tp):
        calls = tp_group(rank, tp)
        block = SparseMoeBlock(H, 4, 2, 21, False, torch.float32, shared_intermediate=30)
        e = block.experts
        e.weight_loader(e.w13_weight, hf.experts.gate_up_proj.data, ("gate_up", None))
        e.weight_loader(e.w2_weight, hf.experts.down_proj.data, ("down", None))
        assert e.loaded_params() == {"w13_weight", "w2_weight"}
        block.gate.weight_loader(block.gate.weight, hf.gate.weight.data)
        block.shared_expert_gate.weight_loader(
            block.shared_expert_gate.weight, hf.shared_expert_gate.weight.data
        )
        s = block.shared_expert
        s.gate_up_proj.weight_loader(s.gate_up_proj.weight, hf.shared_expert.gate_proj.weight.data, 0)
        s.gate_up_proj.weight_loader(s.gate_up_proj.weight, hf.shared_expert.up_proj.weight.data, 1)
        s.down_proj.weight_loader(s.down_proj.weight, hf.shared_expert.down_proj.weight.data)
        before = len(calls)
        total += block(x)
        assert len(calls) == before + (1 if tp > 1 else 0)
    torch.testing.assert_close(total, want, rtol=1e-5, atol=1e-5)


def test_bad_configurations_are_refused(tp_group):
    with pytest.raises(ValueError, match="num_experts_per_tok 5"):
        FusedMoE(4, 5, H, 8, True)
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        SparseMoeBlock(H, 4, 2, 8, True, hidden_act="gelu")
    tp_group(0, 4)
    with pytest.raises(ValueError, match="exceeds the experts' intermediate size 3"):
        FusedMoE(4, 2, H, 3, True)
    tp_group(0, 1)
    layer = FusedMoE(4, 2, H, 8, True)
    with pytest.raises(ValueError, match="expert 4 is out of range"):
        layer.weight_loader(layer.w13_weight, torch.zeros(8, H), ("gate", 4))
    with pytest.raises(ValueError, match="does not fit"):
        layer.weight_loader(layer.w2_weight, torch.zeros(8, H), ("gate", 0))
    with pytest.raises(ValueError, match="has not 8 in dim 0"):
        layer.weight_loader(layer.w13_weight, torch.zeros(7, H), ("up", 0))
    with pytest.raises(ValueError, match="checkpoint shape"):  # the hidden size
        layer.weight_loader(layer.w2_weight, torch.zeros(H + 1, 8), ("down", 0))
    assert layer.loaded_params() == set()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_experts_match_the_plain_path(dtype):
    """The CPU path packs each expert for its GEMM (and drops the plain weights); same outputs."""
    if not dispatch.use_cpu_kernels_for(torch.device("cpu"), dtype):
        pytest.skip("the CPU kernels do not build here")
    experts = [tuple(w.to(dtype) for w in ws) for ws in expert_weights(4, 40, seed=5)]
    x, logits = torch.randn(9, H).to(dtype), torch.randn(9, 4)
    plain = load(FusedMoE(4, 2, H, 40, True, dtype), experts)
    packed = load(FusedMoE(4, 2, H, 40, True, dtype), experts)
    packed.pack_weights()
    assert packed.packed is not None and packed.w13_weight.numel() == packed.w2_weight.numel() == 0
    got, want = packed(x, logits).float(), plain(x, logits).float()
    # bfloat16: the two paths round their gate/up products apart; allow 2% of the output's scale.
    atol = 1e-5 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype == torch.float32 else 2e-2, atol=atol)
