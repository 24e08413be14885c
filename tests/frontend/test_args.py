"""Engine arguments are checked against their declared types before anything is built."""

from __future__ import annotations

import logging
import pathlib

import pytest
import torch

from distgen import LLM
from distgen.frontend.args import EngineArgs


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(enforce_eager="no"), "enforce_eager must be bool, got 'no'"),  # a non-empty string is truthy
        (dict(enable_prefix_caching="false"), "enable_prefix_caching must be bool"),
        (dict(async_scheduling=1), "async_scheduling must be bool, got 1"),
        (dict(tensor_parallel_size="2"), "tensor_parallel_size must be int, got '2'"),
        (dict(max_num_seqs=2.5), "max_num_seqs must be int, got 2.5"),
        (dict(max_model_len=True), "max_model_len must be int or None, got True"),
        (dict(gpu_memory_utilization="0.5"), "gpu_memory_utilization must be float"),
        (dict(kv_cache_memory="4GiB"), "kv_cache_memory must be int or None"),
        (dict(dtype=32), "dtype must be str or dtype"),
    ],
)
def test_a_wrongly_typed_argument_is_named(kwargs, message):
    with pytest.raises(TypeError, match=message):
        EngineArgs(**kwargs)
    with pytest.raises(TypeError, match=message):  # the same through LLM, before any process starts
        LLM("no/such/model", **kwargs)


def test_the_types_a_user_may_pass(tiny_model_dir):
    config = EngineArgs(
        model=pathlib.Path(tiny_model_dir("llama")),
        dtype=torch.float32,
        gpu_memory_utilization=1,  # an int is a float
        kv_cache_memory=16 << 20,
        max_model_len=None,
    ).create_config()
    assert config.model.dtype == torch.float32 and config.cache.gpu_memory_utilization == 1
    # The server answers with this name in JSON: a path object would not serialize.
    assert config.model.served_model_name == tiny_model_dir("llama")


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1])
def test_a_seed_torch_cannot_take_is_refused_before_the_model_loads(seed, tiny_model_dir):
    """It reached torch.manual_seed in the engine core: "Overflow when unpacking long long"."""
    with pytest.raises(ValueError, match=rf"seed must be a 64-bit signed integer, got {seed}"):
        EngineArgs(model=tiny_model_dir("llama"), seed=seed).create_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"quantization": "awq"}, r"quantization='awq' is not supported"),
        ({"kv_cache_dtype": "fp8"}, r"kv_cache_dtype='fp8' is not supported"),
        ({"tokenizer_mode": "mistral"}, r"tokenizer_mode='mistral' is not supported"),
        ({"load_format": "pt"}, r"load_format='pt' is not supported"),
        ({"load_format": "gguf"}, r"load_format='gguf', but the model path holds a Hugging Face directory"),
    ],
)
def test_vllm_arguments_distgen_cannot_honour_are_refused(kwargs, message, tiny_model_dir):
    """Taken as vLLM spells them (so its scripts run), but never silently ignored when they ask for
    something distgen does not do."""
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=tiny_model_dir("llama"), **kwargs).create_config()


def test_vllm_arguments_without_a_counterpart_change_nothing(tiny_model_dir, caplog):
    model = tiny_model_dir("llama")
    plain = EngineArgs(model=model).create_config()
    with caplog.at_level("INFO", logger="distgen"):
        given = EngineArgs(
            model=model,
            trust_remote_code=True,
            download_dir="/nowhere",  # for hub models only: a local path is read where it is
            revision="v2",
            swap_space=8,
            disable_custom_all_reduce=True,
            load_format="safetensors",
            tokenizer_mode="hf",
            kv_cache_dtype="auto",
            pipeline_parallel_size=1,
        ).create_config()
    assert given == plain
    said = [r.getMessage() for r in caplog.records]
    for name in ("trust_remote_code", "swap_space", "disable_custom_all_reduce"):
        assert any(m.startswith("has no effect in distgen: " + name) for m in said), (name, said)
    assert any(m.startswith("revision 'v2' has no effect: model") for m in said), said


@pytest.mark.parametrize("runner, convert", [("auto", "auto"), ("generate", "none"), ("generate", "auto")])
def test_the_runner_resolves_to_generate(runner, convert, caplog):
    with caplog.at_level(logging.INFO, logger="distgen"):
        config = EngineArgs(runner=runner, convert=convert, max_model_len=256).create_config()
    assert config.model.runner_type == "generate"
    assert "runner: generate" in caplog.text and "LlamaForCausalLM" in caplog.text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"runner": "pooling"}, "runner='pooling' is not supported: distgen runs generative models only"),
        ({"runner": "draft"}, "runner='draft' is not supported"),
        ({"runner": "embed"}, "runner must be one of auto, generate, pooling, draft"),
        ({"convert": "embed"}, "convert='embed' turns the model into a pooling model"),
        ({"convert": "reward"}, "convert='reward' turns the model into a pooling model"),
        ({"convert": "x"}, "convert must be one of auto, none, embed, classify, reward"),
    ],
)
def test_pooling_and_draft_runners_are_refused_before_loading(kwargs, message, monkeypatch):
    def no_loading(*a, **k):
        raise AssertionError("the model was looked up before the runner was checked")

    monkeypatch.setattr("distgen.frontend.args.resolve_model", no_loading)
    with pytest.raises(ValueError, match=message):
        EngineArgs(**kwargs).create_config()


@pytest.mark.parametrize(
    "given,want",
    [
        (1 << 20, 1 << 20),
        ("4G", 4 << 30),  # vLLM: upper case is binary
        ("4g", 4 * 10**9),  # lower case decimal
        ("512M", 512 << 20),
        ("1.5K", 1536),
        ("4GiB", 4 << 30),
        ("4GB", 4 * 10**9),
        ("123", 123),
    ],
)
def test_kv_cache_memory_bytes_takes_vllms_units(given, want, tiny_model_dir):
    config = EngineArgs(model=tiny_model_dir("llama"), kv_cache_memory_bytes=given).create_config()
    assert config.cache.kv_cache_memory == want


def test_kv_cache_memory_bytes_refuses_nonsense_and_a_disagreement(tiny_model_dir):
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match="kv_cache_memory_bytes: not a size: 'lots'"):
        EngineArgs(model=path, kv_cache_memory_bytes="lots").create_config()
    with pytest.raises(ValueError, match="disagree: give one of them"):
        EngineArgs(model=path, kv_cache_memory=1 << 20, kv_cache_memory_bytes="2M").create_config()
    config = EngineArgs(model=path, kv_cache_memory=2 << 20, kv_cache_memory_bytes="2M").create_config()
    assert config.cache.kv_cache_memory == 2 << 20


def test_override_generation_config_lays_keys_over_the_models(tiny_model_dir, tmp_path):
    import json
    import shutil

    path = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), path)
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "top_p": 0.9}))
    llm = LLM(str(path), override_generation_config={"temperature": 0.2, "max_new_tokens": 5})
    try:
        params = llm.get_default_sampling_params()
        assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.9, 5)
    finally:
        llm.shutdown()
    # With generation_config "vllm" the model's file is ignored: only the overrides count.
    llm = LLM(str(path), generation_config="vllm", override_generation_config={"top_k": 3})
    try:
        params = llm.get_default_sampling_params()
        assert (params.top_k, params.top_p, params.temperature) == (3, 1.0, 1.0)
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="override_generation_config: unknown key.* temprature"):
        LLM(str(path), override_generation_config={"temprature": 0.2})
    bad = "with override_generation_config: SamplingParams.temperature must be >= 0"
    with pytest.raises(ValueError, match=bad):
        LLM(str(path), override_generation_config={"temperature": -1})


def test_hf_overrides_change_the_config_the_workers_build(tiny_model_dir):
    from distgen import SamplingParams
    from distgen.frontend.args import merge_overrides

    assert merge_overrides({"a": 1, "r": {"t": "x", "f": 1.0}}, {"r": {"f": 2.0}, "b": 2}) == {
        "a": 1,
        "r": {"t": "x", "f": 2.0},
        "b": 2,
    }
    path = tiny_model_dir("llama")
    config = EngineArgs(model=path, hf_overrides={"max_position_embeddings": 256}).create_config()
    assert (
        config.model.max_model_len == 256 and config.model.source.hf_config["max_position_embeddings"] == 256
    )
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompt = {"prompt_token_ids": [5, 6, 7, 8, 9]}
    outs = []
    for overrides in (None, {"rms_norm_eps": 10.0}):
        llm = LLM(path, dtype="float32", hf_overrides=overrides, kv_cache_memory=16 << 20)
        outs.append(llm.generate(prompt, greedy, use_tqdm=False)[0].outputs[0].token_ids)
        llm.shutdown()
    assert outs[0] != outs[1]  # the model ran with the overridden norm epsilon
