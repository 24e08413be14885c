"""Naming a model: a directory, a .gguf file, or a hub id found in the local Hugging Face cache (offline
here; downloads are tested against a hub of the test's own in test_hub.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest

from distgen.frontend.args import EngineArgs
from distgen.model_loader.loader import load_generation_config, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache_with(cache: Path, repo_id: str, model_dir: str) -> Path:
    """The layout ``huggingface_hub`` leaves after a download: refs/main names a snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(model_dir, snapshot)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub is asked
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot(hub_cache, tiny_model_dir):
    snapshot = hub_cache_with(hub_cache, "acme/tiny-llama", tiny_model_dir("llama"))
    source = resolve_model("acme/tiny-llama")
    assert Path(source.path) == snapshot and not source.is_gguf
    assert source.hf_config["architectures"] == ["LlamaForCausalLM"]
    config = EngineArgs(model="acme/tiny-llama", tokenizer="acme/tiny-llama").create_config()
    assert config.model.served_model_name == "acme/tiny-llama"  # as vLLM names it
    assert Path(config.model.tokenizer) == snapshot


def test_offline_a_hub_id_not_in_the_cache_is_named(hub_cache, tiny_model_dir):
    hub_cache_with(hub_cache, "acme/tiny-llama", tiny_model_dir("llama"))
    offline = "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
    with pytest.raises(FileNotFoundError, match=r"model 'acme/other' " + offline):
        resolve_model("acme/other")
    with pytest.raises(FileNotFoundError, match=r"tokenizer 'acme/tok' " + offline):
        EngineArgs(model="acme/tiny-llama", tokenizer="acme/tok").create_config()
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model("no-such-model")  # neither a path nor an org/name id


@pytest.mark.slow
def test_generate_with_a_cached_hub_id(tmp_path, tiny_model_dir):
    """In a fresh process the cache comes from the environment (HF_HUB_CACHE), and the engine core,
    a process of its own, loads the snapshot the front end resolved."""
    model = tiny_model_dir("llama")
    hub_cache_with(tmp_path / "hub", "acme/tiny-llama", model)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}

    def generate(name: str) -> str:
        cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "generate", "Once upon a time"]
        cmd += ["--model", name, "--max-tokens", "6", "--temperature", "0", "--kv-cache-memory", "16MiB"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    assert generate("acme/tiny-llama") == generate(model)


def test_generation_config_nulls_are_unset_and_bad_values_fail_at_load(tmp_path, tiny_model_dir):
    path = tmp_path / "generation_config.json"
    source = resolve_model(tiny_model_dir("llama"))
    path.write_text(json.dumps({"temperature": None, "top_k": 20, "max_new_tokens": None, "do_sample": True}))
    assert load_generation_config(source, str(path)) == {"top_k": 20}
    path.write_text(json.dumps({"temperature": -0.5}))
    with pytest.raises(ValueError, match=r"generation_config\.json: SamplingParams\.temperature must be"):
        load_generation_config(source, str(path))
