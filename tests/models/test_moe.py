"""Mixture-of-experts families (Mixtral, Qwen3-MoE, Qwen2-MoE): every checkpoint tensor lands in its
expert's slice of each rank's stacked weights, and greedy outputs equal transformers' at tp 1 and 2
(the experts' intermediate size split unevenly where it is odd) and over two pipeline stages."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from distgen import LLM, SamplingParams
from distgen.arch_config import ArchConfig
from distgen.distributed import parallel_state as ps
from distgen.distributed.parallel_state import split_range
from distgen.layers.fused_moe import SparseMoeBlock
from distgen.model_loader.safetensors import iter_safetensors
from distgen.models.registry import resolve_model_class
from tests.conftest import VOCAB, assert_engine_idle_and_empty, check_greedy_close, hf_greedy, random_prompts

MAX_NEW = 10
PROMPTS = random_prompts(5, seed=11, hi=40)
ARCHS = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}


def moe_config(arch: str):
    """Tiny configs: Mixtral with an odd expert intermediate size (45: 23 + 22 rows at tp 2); Qwen3-MoE
    with 8 experts, renormalised top-2 and a dense second layer; Qwen2-MoE without renormalisation and
    with its shared expert."""
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        num_experts_per_tok=2,
    )
    if arch == "mixtral":
        return tf.MixtralConfig(**common, intermediate_size=45, num_local_experts=4, sliding_window=None)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(
            **common,
            head_dim=32,
            intermediate_size=96,
            moe_intermediate_size=37,
            num_experts=8,
            norm_topk_prob=True,
            mlp_only_layers=[1],
        )
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=40,
            num_experts=4,
            norm_topk_prob=False,
        )
    raise ValueError(arch)


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory, smollm2_tokenizer):
    """``moe_model(arch)`` -> (path of the saved tiny model, transformers' greedy references)."""
    import transformers as tf

    cache: dict[str, tuple[str, list]] = {}

    def make(arch: str) -> tuple[str, list]:
        if arch not in cache:
            torch.manual_seed(0)
            # The plain per-expert loop: transformers' default grouped_mm refuses the odd sizes on CPU.
            model = tf.AutoModelForCausalLM.from_config(
                moe_config(arch), dtype=torch.float32, experts_implementation="eager"
            ).eval()
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}"))
            model.save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            cache[arch] = (path, hf_greedy(model, PROMPTS, MAX_NEW))
        return cache[arch]

    return make


def _build(path: str, arch: str, rank: int, tp: int, monkeypatch) -> torch.nn.Module:
    monkeypatch.setitem(ps._STATE, "tp", ps._TPGroup(rank, tp, None))
    cfg = {**moe_config(arch).to_dict(), "architectures": [ARCHS[arch]]}
    return resolve_model_class(cfg["architectures"])(cfg, torch.float32)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("tp", [1, 2])
def test_expert_weights_load_into_each_ranks_slices(arch, tp, moe_model, monkeypatch):
    """Each rank's w13 holds rows start..start+n of every expert's gate then up, its w2 those columns
    of down; every parameter is filled and every checkpoint tensor taken."""
    path, _ = moe_model(arch)
    full = {name: w[:] for name, w in iter_safetensors(path)}
    mlp = "block_sparse_moe" if arch == "mixtral" else "mlp"
    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    for rank in range(tp):
        model = _build(path, arch, rank, tp, monkeypatch)
        taken: list[str] = []
        counted = ((taken.append(name) or name, w) for name, w in iter_safetensors(path))
        assert model.load_weights(counted) == {n for n, _ in model.named_parameters()}
        assert sorted(taken) == sorted(full)
        sparse = 0
        for i, layer in enumerate(model.layers):
            if not isinstance(layer.mlp, SparseMoeBlock):
                continue
            sparse += 1
            experts = layer.mlp.experts
            start, n = split_range(experts.intermediate, tp, rank)
            assert layer.mlp.gate.weight.shape[0] == experts.num_experts  # the router, replicated
            for e in range(experts.num_experts):
                gate, up, down = (full[f"model.layers.{i}.{mlp}.experts.{e}.{p}.weight"] for p in names)
                want13 = torch.cat((gate[start : start + n], up[start : start + n]))
                assert torch.equal(experts.w13_weight[e], want13), (arch, tp, rank, i, e)
                assert torch.equal(experts.w2_weight[e], down[:, start : start + n]), (arch, tp, rank, i, e)
        assert sparse == (1 if arch == "qwen3_moe" else 2)


def test_fused_expert_layout_loads_like_per_expert_tensors(moe_model, monkeypatch, tmp_path):
    """A checkpoint holding transformers' fused expert tensors ([E, 2I, H] gate/up, [E, H, I] down)
    gives each rank the same weights as the per-expert one; a missing expert is reported."""
    path, _ = moe_model("qwen2_moe")
    full = {name: w[:] for name, w in iter_safetensors(path)}
    fused = {k: v for k, v in full.items() if ".experts." not in k}
    for i in range(2):
        pre = f"model.layers.{i}.mlp.experts"
        per = [
            [full[f"{pre}.{e}.{p}.weight"] for e in range(4)] for p in ("gate_proj", "up_proj", "down_proj")
        ]
        fused[f"{pre}.gate_up_proj"] = torch.cat((torch.stack(per[0]), torch.stack(per[1])), dim=1)
        fused[f"{pre}.down_proj"] = torch.stack(per[2])
    save_file(fused, str(tmp_path / "model.safetensors"))
    for rank in range(2):
        a = _build(path, "qwen2_moe", rank, 2, monkeypatch)
        a.load_weights(iter_safetensors(path))
        b = _build(path, "qwen2_moe", rank, 2, monkeypatch)
        assert b.load_weights(iter_safetensors(str(tmp_path))) == {n for n, _ in b.named_parameters()}
        for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
            assert torch.equal(x, y), (rank, name)
    c = _build(path, "qwen2_moe", 0, 1, monkeypatch)
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    loaded = c.load_weights((n, w) for n, w in iter_safetensors(path) if n != gone)
    assert {n for n, _ in c.named_parameters()} - loaded == {"layers.1.mlp.experts.w13_weight"}


@pytest.mark.parametrize(
    "arch,tp,pp",
    [
        ("mixtral", 1, 1),
        ("qwen3_moe", 1, 1),
        ("qwen2_moe", 1, 1),
        *(  # worker processes
            pytest.param(arch, tp, pp, marks=pytest.mark.slow)
            for arch, tp, pp in [
                ("mixtral", 2, 1),
                ("qwen3_moe", 2, 1),
                ("qwen3_moe", 1, 2),
                ("qwen2_moe", 2, 1),
            ]
        ),
    ],
)
def test_greedy_matches_transformers(arch, tp, pp, moe_model):
    path, refs = moe_model(arch)
    extra = {"distributed_executor_backend": "mp"} if tp * pp > 1 else {}
    llm = LLM(
        path,
        dtype="float32",
        seed=0,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        kv_cache_memory=8 << 20,
        max_num_batched_tokens=32,  # chunked prefill: prompts of up to 40 tokens split
        **extra,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    tag = f"{arch}/tp{tp}/pp{pp}"
    rate = check_greedy_close(refs, [o.outputs[0].token_ids for o in outs], tag)
    assert rate >= 0.6, f"{tag}: only {rate:.0%} of sequences match exactly"
    assert_engine_idle_and_empty(llm)
    llm.shutdown()


def test_sliding_window_settings():
    """Mixtral attends through its window on every layer (as transformers does); Qwen-MoE's
    per-layer windows (``use_sliding_window``) are refused."""
    mixtral = {
        **moe_config("mixtral").to_dict(),
        "sliding_window": 24,
        "architectures": ["MixtralForCausalLM"],
    }
    model = resolve_model_class(["MixtralForCausalLM"])(mixtral, torch.float32)
    assert [a.sliding_window for a in model.attention_layers()] == [24] * len(model.layers)
    assert all(
        a.sliding_window is None
        for a in resolve_model_class(["MixtralForCausalLM"])(
            {**mixtral, "sliding_window": None}, torch.float32
        ).attention_layers()
    )
    qwen = {**moe_config("qwen3_moe").to_dict(), "use_sliding_window": True, "sliding_window": 64}
    with pytest.raises(ValueError, match="use_sliding_window"):
        resolve_model_class(["Qwen3MoeForCausalLM"])(qwen, torch.float32)


def test_pipeline_balance_counts_the_experts_a_token_runs():
    """Stage balancing weighs a layer's MLP by the experts a token passes through."""

    def width(cfg: dict) -> int:
        return ArchConfig.from_hf(cfg).active_mlp_width

    assert width(moe_config("mixtral").to_dict()) == 2 * 45
    assert width(moe_config("qwen3_moe").to_dict()) == 2 * 37
    assert width(moe_config("qwen2_moe").to_dict()) == 2 * 32 + 40
    dense = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=128)
    assert width({**dense, "intermediate_size": 96}) == 96
    assert width(dense) == 4 * 64


def test_sparse_and_dense_layers_follow_transformers_rule():
    """Qwen-MoE: experts in every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``, as
    transformers builds its layers."""
    import transformers as tf

    kw = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=2, mlp_only_layers=[3],
    )  # fmt: skip
    hf_cfg = tf.Qwen3MoeConfig(**kw)
    hf = tf.AutoModelForCausalLM.from_config(hf_cfg)
    want = [type(layer.mlp).__name__.endswith("SparseMoeBlock") for layer in hf.model.layers]
    assert want == [False, True, False, False, False, True]
    ours = resolve_model_class(["Qwen3MoeForCausalLM"])(hf_cfg.to_dict(), torch.float32)
    assert [isinstance(layer.mlp, SparseMoeBlock) for layer in ours.layers] == want
