"""Phi-3: fused qkv/gate_up weights split per TP rank, LongRoPE with a partial rotary as transformers
computes it, greedy outputs equal to transformers' at tp 1 and 2, and with a sliding window shorter
than the sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distgen import LLM, SamplingParams
from distgen.distributed import parallel_state as ps
from distgen.distributed.parallel_state import split_range
from distgen.layers.linear import HeadShard
from distgen.layers.rotary import LongRopeSwitch
from distgen.model_loader.safetensors import iter_safetensors
from distgen.models.phi3 import Phi3ForCausalLM, partial_rotary_perm
from tests.conftest import (
    PHI3_ORIGINAL_MAX,
    _tiny_config,
    assert_engine_idle_and_empty,
    check_greedy_close,
    hf_greedy,
    random_prompts,
)

MAX_NEW = 12
# Prompts inside the original length: transformers rotates them with the short factors and switches
# to the long ones once a decode passes the original length.
SHORT = random_prompts(6, seed=3, lo=3, hi=PHI3_ORIGINAL_MAX - 2)
# Prompts past it: transformers rotates every token of these with the long factors.
LONG = random_prompts(3, seed=4, lo=PHI3_ORIGINAL_MAX + 5, hi=80)
# A short prompt that is the start of a long one: its KV blocks must not serve the long one.
PREFIX = LONG[0][: PHI3_ORIGINAL_MAX - 4]


def _hf_rotary():
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    return Phi3RotaryEmbedding(_tiny_config("phi3"))


def _hf_config_dict() -> dict:
    return {**_tiny_config("phi3").to_dict(), "architectures": ["Phi3ForCausalLM"]}


def test_longrope_tables_match_transformers_rope_init():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = _tiny_config("phi3")
    rotary = Phi3ForCausalLM.rotary_of(_hf_config_dict())
    assert rotary.long_rope == LongRopeSwitch(PHI3_ORIGINAL_MAX, 1024)
    assert rotary.cos.shape == (2048, 8)  # the short rows, then the long ones
    init = ROPE_INIT_FUNCTIONS["longrope"]
    short, scale = init(hf_cfg, None)
    long, long_scale = init(hf_cfg, None, seq_len=PHI3_ORIGINAL_MAX + 1)
    assert scale == long_scale == pytest.approx((1 + 1) ** 0.5)  # factor 1024/32 = 32: sqrt(1 + ln 32/ln 32)
    assert not torch.equal(short, long)
    for p in (0, 1, PHI3_ORIGINAL_MAX - 1, PHI3_ORIGINAL_MAX, 100, 1023):
        for row, inv in ((p, short), (1024 + p, long)):
            f = torch.tensor(float(p)) * inv
            torch.testing.assert_close(rotary.cos[row, :6], f.cos() * scale, rtol=0, atol=0)
            torch.testing.assert_close(rotary.sin[row, :6], f.sin() * scale, rtol=0, atol=0)
    # The 4 dims that do not turn (2 pairs).
    assert torch.equal(rotary.cos[:, 6:], torch.ones(2048, 2))
    assert torch.equal(rotary.sin[:, 6:], torch.zeros(2048, 2))


def test_long_rope_switch_rows():
    """Long rows for every token of a prompt past the original length, and from the original length
    on in a shorter prompt's request (transformers' per-call switch, as generation meets it)."""
    switch = LongRopeSwitch(original=32, offset=1024)
    pos = np.array([0, 31, 32, 40, 0, 31, 32])
    prompt = np.array([32, 32, 32, 32, 33, 33, 33])
    assert switch.rows(pos, prompt).tolist() == [0, 31, 1056, 1064, 1024, 1055, 1056]


@pytest.mark.parametrize("prompt_len", [1, 20, PHI3_ORIGINAL_MAX, PHI3_ORIGINAL_MAX + 1, 50])
def test_rotation_of_permuted_heads_equals_transformers_partial_rotary(prompt_len):
    """transformers on a whole prompt and then one decode, against distgen's rotary at the rows its
    switch picks, on the permuted head layout, permuted back."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    hf = _hf_rotary()
    rotary = Phi3ForCausalLM.rotary_of(_hf_config_dict())
    perm = partial_rotary_perm(16, 12)
    inverse = torch.argsort(perm)
    torch.manual_seed(prompt_len)
    q = torch.randn(1, 4, prompt_len + 1, 16)
    calls = [torch.arange(prompt_len), torch.tensor([prompt_len])]  # the prompt, then a decode
    for positions in calls:
        x = q[:, :, positions]
        cos, sin = hf(x, positions[None])
        want, _ = apply_rotary_pos_emb(x, x, cos, sin)
        rows = rotary.long_rope.rows(positions.numpy(), np.full(len(positions), prompt_len))
        qp = x[0][..., perm].transpose(0, 1)  # [T, H, D] in distgen's layout
        ours, _ = rotary(torch.from_numpy(rows), qp, qp)
        torch.testing.assert_close(ours.transpose(0, 1)[..., inverse], want[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2, 3])
def test_fused_weights_load_into_each_ranks_shards(tp, tiny_model_dir, monkeypatch):
    """Each rank's qkv_proj holds its q heads and the KV heads they read (q and k permuted for the
    partial rotary) and its gate_up_proj its slices of gate and up, read lazily from the safetensors."""
    path = tiny_model_dir("phi3")
    full = {name: w[:] for name, w in iter_safetensors(path)}
    cfg = _hf_config_dict()
    d, inter = 16, cfg["intermediate_size"]
    perm = partial_rotary_perm(d, 12)

    def heads(w: torch.Tensor, start: int, n: int) -> torch.Tensor:
        return w.unflatten(0, (-1, d))[start : start + n][:, perm].flatten(0, 1)

    for rank in range(tp):
        monkeypatch.setitem(ps._STATE, "tp", ps._TPGroup(rank, tp, None))
        model = Phi3ForCausalLM(cfg, torch.float32)
        loaded = model.load_weights(iter_safetensors(path))
        assert loaded == {n for n, _ in model.named_parameters()}
        s = HeadShard.of(4, 2, tp, rank)
        for i, layer in enumerate(model.layers):
            qkv = full[f"model.layers.{i}.self_attn.qkv_proj.weight"]
            q, k, v = qkv.split([64, 32, 32])
            vs = v.unflatten(0, (-1, d))[s.kv_start : s.kv_start + s.num_kv_heads].flatten(0, 1)
            want = torch.cat((heads(q, s.q_start, s.num_heads), heads(k, s.kv_start, s.num_kv_heads), vs))
            assert torch.equal(layer.self_attn.qkv_proj.weight, want), (tp, rank, i)
            gate, up = full[f"model.layers.{i}.mlp.gate_up_proj.weight"].split([inter, inter])
            start, n = split_range(inter, tp, rank)
            want = torch.cat((gate[start : start + n], up[start : start + n]))
            assert torch.equal(layer.mlp.gate_up_proj.weight, want), (tp, rank, i)


@pytest.fixture(scope="module")
def references(hf_reference):
    return hf_reference("phi3", SHORT + LONG, MAX_NEW)


@pytest.mark.parametrize(
    "tp,kwargs",
    [
        (1, {"block_size": 4}),
        (2, {"distributed_executor_backend": "mp", "max_num_batched_tokens": 16}),
        (1, {"distributed_executor_backend": "mp", "pipeline_parallel_size": 2}),
    ],
    ids=["tp1-prefix-cache", "tp2-mp-chunked", "pp2-mp"],
)
def test_greedy_matches_transformers(tp, kwargs, tiny_model_dir, references):
    llm = LLM(
        tiny_model_dir("phi3"),
        dtype="float32",
        seed=0,
        tensor_parallel_size=tp,
        kv_cache_memory=16 << 20,
        **kwargs,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    # A short prompt first, whose cached blocks hold the start of a long prompt rotated the short way.
    llm.generate([{"prompt_token_ids": PREFIX}], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in SHORT + LONG], params, use_tqdm=False)
    tag = f"phi3/tp{tp}/pp{kwargs.get('pipeline_parallel_size', 1)}"
    rate = check_greedy_close(references, [o.outputs[0].token_ids for o in outs], tag)
    assert rate >= 0.5, f"{tag}: only {rate:.0%} of sequences match exactly"
    assert_engine_idle_and_empty(llm)
    llm.shutdown()


WINDOW = 16


@pytest.fixture(scope="module")
def windowed_phi3(tmp_path_factory, smollm2_tokenizer) -> str:
    """The tiny phi3 with a sliding window of 16 tokens, which every prompt and most decodes cross."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = _tiny_config("phi3")
    cfg.sliding_window = WINDOW
    model = tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    path = str(tmp_path_factory.mktemp("tiny-phi3-window"))
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_sequences_longer_than_the_sliding_window_match_transformers(windowed_phi3):
    """Windowed attention on every layer, as transformers masks it: sequences up to 92 tokens with a
    16-token window, prefilled in chunks of 16 after a prefix-cache hit; the window changes the
    reference (so it is honoured, not ignored)."""
    import transformers as tf

    prompts = SHORT[:3] + LONG
    hf = tf.AutoModelForCausalLM.from_pretrained(windowed_phi3, dtype=torch.float32).eval()
    refs = hf_greedy(hf, prompts, MAX_NEW)
    hf.config.sliding_window = None
    assert hf_greedy(hf, prompts, MAX_NEW) != refs
    llm = LLM(
        windowed_phi3,
        dtype="float32",
        seed=0,
        kv_cache_memory=16 << 20,
        block_size=4,
        max_num_batched_tokens=16,
        max_model_len=256,  # past the window: no longer capped by it
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    # Long (past LongRoPE's original length) like the prompt whose first blocks it caches.
    llm.generate([{"prompt_token_ids": LONG[0][:40]}], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    rate = check_greedy_close(refs, [o.outputs[0].token_ids for o in outs], "phi3/window")
    assert rate >= 0.5, f"phi3/window: only {rate:.0%} of sequences match exactly"
    assert_engine_idle_and_empty(llm)
    llm.shutdown()


@pytest.mark.parametrize(
    "style",
    ["phi-3-mini-128k (transformers 4: rope_scaling su)", "phi-4-mini (partial rotary 0.75)"],
)
def test_checkpoint_style_configs_read_as_transformers_reads_them(style):
    """config.json as the published checkpoints write it (rope_scaling, original_max_position_embeddings
    and partial_rotary_factor at the top level), shrunk to 16384 positions: the same tables as
    transformers' rope init on a Phi3Config built from the same dict."""
    import transformers as tf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    phi4 = style.startswith("phi-4")
    heads, partial = (24, 0.75) if phi4 else (32, 1.0)
    half = int(3072 // heads * partial) // 2
    cfg = {
        "architectures": ["Phi3ForCausalLM"],
        "hidden_size": 3072,
        "num_hidden_layers": 32,
        "vocab_size": 200064 if phi4 else 32064,
        "num_attention_heads": heads,
        "num_key_value_heads": 8 if phi4 else 32,
        "max_position_embeddings": 16384,
        "original_max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "partial_rotary_factor": partial,
        "rope_scaling": {
            "type": "longrope" if phi4 else "su",
            "short_factor": [1.0 + i / 100 for i in range(half)],
            "long_factor": [1.0 + i for i in range(half)],
        },
        "sliding_window": 262144,
    }
    rotary = Phi3ForCausalLM.rotary_of(cfg)
    assert rotary.long_rope == LongRopeSwitch(4096, 16384)
    hf_cfg = tf.Phi3Config(**{k: v for k, v in cfg.items() if k != "architectures"})
    init = ROPE_INIT_FUNCTIONS["longrope"]
    (short, scale), (long, _) = init(hf_cfg, None), init(hf_cfg, None, seq_len=4097)
    for p in (0, 4095, 4096, 16383):
        for row, inv in ((p, short), (16384 + p, long)):
            torch.testing.assert_close(rotary.cos[row, :half], (p * inv).cos() * scale, rtol=0, atol=0)
