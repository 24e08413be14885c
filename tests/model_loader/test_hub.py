"""Models named by hub id are downloaded through ``huggingface_hub``, tested against a hub served by the
test itself (``HF_ENDPOINT``): only the files a generative model needs, into the cache or
``download_dir``, at a ``revision``, with ``HF_TOKEN`` for a private repository, a GGUF file by
``org/name:file.gguf``; offline (``HF_HUB_OFFLINE``) from the filled cache; and errors that name the
model, the hub and the way out."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.model_loader.fake_hub import FakeHub

pytestmark = pytest.mark.slow

RESOLVE = textwrap.dedent(
    """
    import json, os, sys
    from distgen.frontend.args import EngineArgs
    kwargs = json.loads(sys.argv[1])
    try:
        config = EngineArgs(**kwargs).create_config()
    except Exception as e:
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
    else:
        source = config.model.source
        files = sorted(os.listdir(source.path)) if os.path.isdir(source.path) else [source.path]
        print(json.dumps({"path": source.path, "files": files, "gguf": source.is_gguf,
                          "max_model_len": config.model.max_model_len}))
    """
)


def _resolve(env: dict[str, str], **kwargs) -> dict:
    """EngineArgs(**kwargs).create_config() in a fresh process with ``env`` (huggingface_hub reads
    HF_ENDPOINT and the cache settings at import)."""
    res = subprocess.run(
        [sys.executable, "-c", RESOLVE, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture
def repo(tiny_model_dir, tmp_path) -> Path:
    """The tiny model as a hub repository holds it, with files distgen must not fetch."""
    d = tmp_path / "repo"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "pytorch_model.bin").write_bytes(b"weights distgen never loads")
    (d / "README.md").write_text("# tiny")
    return d


def _generate(env: dict[str, str], model: str) -> str:
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "generate", "Once upon a time", "--model", model]
    cmd += ["--max-tokens", "6", "--temperature", "0", "--kv-cache-memory", "16MiB"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_download_once_then_run_offline(repo, tmp_path):
    cache = tmp_path / "cache"
    with FakeHub({"acme/tiny-llama": {"main": repo}}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache)}
        assert _generate(env, "acme/tiny-llama") == _generate({}, str(repo))
        fetched = {r.rsplit("/", 1)[1] for r in hub.requests if r.startswith("GET /acme/")}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
        assert not fetched & {"pytorch_model.bin", "README.md"}  # only what a generative model needs
        hub.requests.clear()
        offline = _resolve({**env, "HF_HUB_OFFLINE": "1"}, model="acme/tiny-llama")
        assert hub.requests == [] and "model.safetensors" in offline["files"]
        assert Path(offline["path"]).is_relative_to(cache)


def test_revision_download_dir_and_a_private_repo(repo, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(repo, small)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    with FakeHub({"acme/tiny-llama": {"main": repo, "small": small}}, token="hf_secret") as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
        err = _resolve(env, model="acme/tiny-llama")["error"]
        assert "'acme/tiny-llama' not found on " + hub.url in err and "set HF_TOKEN" in err
        env["HF_TOKEN"] = "hf_secret"
        where = tmp_path / "downloads"
        got = _resolve(env, model="acme/tiny-llama", revision="small", download_dir=str(where))
        assert got["max_model_len"] == 256 and Path(got["path"]).is_relative_to(where)
        assert _resolve(env, model="acme/tiny-llama")["max_model_len"] == 1024  # main
        err = _resolve(env, model="acme/tiny-llama", revision="v9")["error"]
        assert f"'acme/tiny-llama' has no revision 'v9' on {hub.url}" in err


def test_one_gguf_file_of_a_repository(tmp_path):
    from distgen.model_loader.gguf import default_model_path

    gguf = Path(default_model_path())
    d = tmp_path / "gguf-repo"
    d.mkdir()
    os.symlink(gguf, d / gguf.name)
    with FakeHub({"acme/smol-gguf": {"main": d}}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
        got = _resolve(env, model=f"acme/smol-gguf:{gguf.name}")
        assert got["gguf"] and got["path"].endswith(gguf.name)
        assert Path(got["path"]).read_bytes() == gguf.read_bytes()


def test_no_network_names_the_model_the_hub_and_offline_mode(tmp_path):
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_CACHE": str(tmp_path / "cache")}  # nothing listens
    err = _resolve(env, model="acme/tiny-llama")["error"]
    assert "'acme/tiny-llama'" in err and "http://127.0.0.1:9" in err and "HF_HUB_OFFLINE=1" in err
    err = _resolve({**env, "HF_HUB_OFFLINE": "1"}, model="acme/tiny-llama")["error"]
    assert "is not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in err
