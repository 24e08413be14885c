"""Gemma 2 and Gemma 3 (text): greedy float32 outputs equal to transformers' with prompts and decodes
longer than a 16-token sliding window, chunked prefill and prefix-cache hits, on the CPU kernels' and
the torch attention paths, at tp 1 and 2; soft-capping (Gemma 2) active and matched; the configs'
layer types and rotary settings read as transformers reads them."""

from __future__ import annotations

import pytest
import torch

from distgen import LLM, SamplingParams
from distgen.arch_config import FULL, SLIDING, gemma3_rope, layer_types
from distgen.kernels import dispatch
from distgen.models.gemma2 import Gemma2ForCausalLM
from distgen.models.gemma3 import Gemma3ForCausalLM
from tests.conftest import VOCAB, assert_engine_idle_and_empty, check_greedy_close, hf_greedy, random_prompts
from tests.layers.model_steps import make_runner, run_steps

WINDOW = 16
MAX_NEW = 12
PROMPTS = random_prompts(5, seed=7, lo=3, hi=60) + [random_prompts(1, seed=8, lo=58, hi=60)[0]]
PREFIX = PROMPTS[-1][:40]  # run first: its blocks serve the last prompt (a prefix-cache hit)
ATTN_CAP, FINAL_CAP = 1.0, 2.0  # small enough to change the tiny models' scores and logits


def _config(arch: str, caps: bool = True, window: int = WINDOW):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=1024,
        initializer_range=0.1,
        sliding_window=window,
        query_pre_attn_scalar=24,  # not head_dim: the scale must come from it
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "gemma2":  # layer_types left to the every-other rule: sliding, full, sliding, full
        return tf.Gemma2Config(
            **common,
            head_dim=16,
            attn_logit_softcapping=ATTN_CAP if caps else None,
            final_logit_softcapping=FINAL_CAP if caps else None,
        )
    return tf.Gemma3TextConfig(
        **common,
        head_dim=32,  # not hidden / heads
        layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        rope_parameters={
            FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        },
    )


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, smollm2_tokenizer):
    """``gemma_dir(arch)`` -> a saved tiny random model whose norm weights are random too (transformers
    initialises them to 0, which would leave the ``1 + w`` untested)."""
    import transformers as tf

    cache: dict[tuple[str, int], str] = {}

    def make(arch: str, window: int = WINDOW) -> str:
        if (arch, window) not in cache:
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(_config(arch, window=window), dtype=torch.float32)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.copy_(0.3 * torch.randn_like(p))
            path = str(tmp_path_factory.mktemp(f"tiny-{arch}-w{window}"))
            model.save_pretrained(path)
            smollm2_tokenizer.save_pretrained(path)
            cache[arch, window] = path
        return cache[arch, window]

    return make


def _hf_model(path: str):
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def references(gemma_dir):
    cache: dict[str, list] = {}

    def get(arch: str):
        if arch not in cache:
            cache[arch] = hf_greedy(_hf_model(gemma_dir(arch)), PROMPTS, MAX_NEW)
        return cache[arch]

    return get


def _run(llm: LLM, tag: str, refs) -> None:
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    llm.generate([{"prompt_token_ids": PREFIX}], params, use_tqdm=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert llm.llm_engine.get_stats().prefix_cache_hits > 0
    rate = check_greedy_close(refs, [o.outputs[0].token_ids for o in outs], tag)
    assert rate >= 0.5, f"{tag}: only {rate:.0%} of sequences match exactly"
    assert_engine_idle_and_empty(llm)
    llm.shutdown()


@pytest.mark.parametrize("path", ["cpu", "torch"])
@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_greedy_matches_transformers_tp1(arch, path, gemma_dir, references, monkeypatch):
    """Chunks of 16 tokens (prompts cross the window inside a chunk and between chunks), blocks of 4."""
    if path == "cpu" and not dispatch.use_cpu_kernels_for(torch.device("cpu"), torch.float32):
        pytest.skip("the CPU kernels do not build here")
    monkeypatch.setenv("DISTGEN_KERNELS", path)
    with dispatch.kernel_mode(path):
        llm = LLM(
            gemma_dir(arch),
            dtype="float32",
            seed=0,
            kv_cache_memory=16 << 20,
            block_size=4,
            max_num_batched_tokens=16,
        )
        _run(llm, f"{arch}/tp1/{path}", references(arch))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_greedy_matches_transformers_tp2(arch, gemma_dir, references):
    """Two heads and one KV head per rank; chunked prefill and a prefix-cache hit."""
    llm = LLM(
        gemma_dir(arch),
        dtype="float32",
        seed=0,
        tensor_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=16 << 20,
        block_size=8,
        max_num_batched_tokens=24,
    )
    _run(llm, f"{arch}/tp2", references(arch))


@pytest.mark.slow
def test_triton_path_matches_the_torch_path_with_a_short_window(gemma_dir):
    """Hand-scheduled runner steps (chunked prefill, a prefix-cache hit, mixed decodes; contexts up to
    12 tokens) on Gemma 2 with a window of 4 and both soft-caps: the Triton kernels (in the interpreter
    on a CPU-only machine, hence slow) give the torch path's tokens and logprobs."""
    path = gemma_dir("gemma2", window=4)
    with dispatch.kernel_mode("torch"):
        ref = run_steps(make_runner(path, "cpu"))
    with dispatch.kernel_mode("auto" if torch.cuda.is_available() else "triton"):
        got = run_steps(make_runner(path, "cuda" if torch.cuda.is_available() else "cpu"))
    assert len(got) == len(ref) == 5
    for i, ((tok, lp), (ref_tok, ref_lp)) in enumerate(zip(got, ref)):
        assert tok == ref_tok, f"step {i}: sampled {tok}, torch path {ref_tok}"
        torch.testing.assert_close(torch.tensor(lp), torch.tensor(ref_lp), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_pipeline_stages_match_transformers(gemma_dir, references):
    """Two stages of Gemma 3's layers [sliding, sliding | full, sliding]: each stage takes its layers'
    types and rotaries by their global index; the tied head sits on the last stage."""
    llm = LLM(
        gemma_dir("gemma3"),
        dtype="float32",
        seed=0,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        kv_cache_memory=16 << 20,
        block_size=8,
    )
    _run(llm, "gemma3/pp2", references("gemma3"))


def test_softcaps_change_the_logits_and_distgen_applies_them(gemma_dir):
    """The caps move transformers' logits well beyond rounding, and distgen's log-probabilities of
    its greedy tokens are transformers' log-softmax of the capped logits."""
    import transformers as tf

    path = gemma_dir("gemma2")
    capped = _hf_model(path)
    uncapped = tf.AutoModelForCausalLM.from_config(_config("gemma2", caps=False), dtype=torch.float32)
    uncapped.load_state_dict(capped.state_dict())
    uncapped.eval()
    ids = torch.tensor([PROMPTS[-1]])
    with torch.inference_mode():
        want = capped(ids).logits[0]
        assert (want - uncapped(ids).logits[0]).abs().max() > 0.1
        assert want.abs().max() < FINAL_CAP
        capped.config.final_logit_softcapping = None  # attention cap alone
        assert (capped(ids).logits[0] - uncapped(ids).logits[0]).abs().max() > 1e-2
    llm = LLM(path, dtype="float32", seed=0, kv_cache_memory=16 << 20)
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=0)
    out = llm.generate([{"prompt_token_ids": PROMPTS[-1]}], params, use_tqdm=False)[0].outputs[0]
    llm.shutdown()
    token = out.token_ids[0]
    assert token == int(want[-1].argmax())
    logprob = torch.log_softmax(want[-1], -1)[token]
    assert out.logprobs[0][token].logprob == pytest.approx(float(logprob), abs=1e-4)


def test_layer_types_and_rope_settings_from_either_config_generation():
    assert layer_types(4, None, 2) == (SLIDING, FULL, SLIDING, FULL)
    assert layer_types(7, None, 6) == (SLIDING,) * 5 + (FULL, SLIDING)
    assert layer_types(3, None, 3) == (SLIDING, SLIDING, FULL)
    with pytest.raises(ValueError, match="layer_types"):
        layer_types(2, [SLIDING, "chunked_attention"], 2)
    v5 = _config("gemma3").to_dict()
    assert gemma3_rope(v5, FULL) == (1e6, v5["rope_parameters"][FULL])
    assert gemma3_rope(v5, SLIDING)[0] == 10000.0
    # transformers 4's config.json: rope_theta, rope_local_base_freq and rope_scaling at the top level.
    linear = {"rope_type": "linear", "factor": 8.0}
    v4 = {"rope_theta": 1e6, "rope_local_base_freq": 1e4, "rope_scaling": linear}
    assert gemma3_rope(v4, FULL) == (1e6, linear)
    assert gemma3_rope(v4, SLIDING) == (1e4, None)


def test_global_layers_rotate_as_transformers_does():
    """The full layers' linear-scaled rotary and the sliding layers' local one, against transformers'
    per-layer-type tables."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    hf_cfg = _config("gemma3")
    hf = Gemma3RotaryEmbedding(hf_cfg)
    cfg = hf_cfg.to_dict()
    pos = torch.arange(0, 1000, 37)
    for t in (FULL, SLIDING):
        cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos[None], t)
        ours = Gemma3ForCausalLM.rotary_for(cfg, t)
        torch.testing.assert_close(ours.cos[pos], cos[0, :, :16], rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.sin[pos], sin[0, :, :16], rtol=0, atol=1e-6)


def test_unsupported_configs_are_refused():
    cfg = {**_config("gemma2").to_dict(), "architectures": ["Gemma2ForCausalLM"]}
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        Gemma2ForCausalLM({**cfg, "use_bidirectional_attention": True}, torch.float32)
    with pytest.raises(ValueError, match="hidden_activation"):
        Gemma2ForCausalLM({**cfg, "hidden_activation": "relu"}, torch.float32)
