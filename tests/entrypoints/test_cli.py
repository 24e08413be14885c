"""The ``distgen`` command: flags mirror EngineArgs, YAML configs, sizes, and a one-shot ``generate``."""

from __future__ import annotations

import argparse
import dataclasses
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distgen.entrypoints.cli import _apply_config, build_parser, engine_args_from, parse_size
from distgen.frontend.args import EngineArgs

ROOT = Path(__file__).resolve().parents[2]


def _parse(*argv: str) -> argparse.Namespace:
    return _apply_config(build_parser(), list(argv))


def test_every_engine_argument_is_a_serve_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for f in dataclasses.fields(EngineArgs):
        if f.name != "model":
            assert "--" + f.name.replace("_", "-") in help_text, f.name


def test_vllm_flag_names_and_defaults():
    ns = _parse(
        "serve", "m", "-tp", "4", "--distributed-executor-backend", "ray", "--no-enable-prefix-caching"
    )
    args = engine_args_from(ns)
    assert (args.model, args.tensor_parallel_size, args.distributed_executor_backend) == ("m", 4, "ray")
    assert args.enable_prefix_caching is False
    assert (ns.host, ns.port, ns.api_key) == ("127.0.0.1", 8000, None)
    assert engine_args_from(_parse("serve")) == EngineArgs()
    ns = _parse(
        "serve",
        "m",
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "hermes",
        "--reasoning-parser",
        "qwen3",
    )
    assert (ns.enable_auto_tool_choice, ns.tool_call_parser, ns.reasoning_parser) == (True, "hermes", "qwen3")


def test_a_vllm_launch_line_parses_unchanged():
    """Flags vLLM users carry in their scripts: taken, and checked when the engine starts."""
    line = (
        "serve m --trust-remote-code --disable-log-requests --disable-log-stats --swap-space 16 "
        "--gpu-memory-utilization 0.85 --max-model-len 4096 --kv-cache-dtype auto --dtype bfloat16 "
        "--load-format safetensors --tokenizer-mode auto --pipeline-parallel-size 1 "
        "--disable-custom-all-reduce --uvicorn-log-level warning --enable-log-requests --runner generate "
        "--convert none"
    )
    ns = _parse(*line.split())
    args = engine_args_from(ns)
    assert (args.runner, args.convert) == ("generate", "none")
    assert (args.trust_remote_code, args.disable_log_stats, args.swap_space) == (True, True, 16.0)
    assert (args.gpu_memory_utilization, args.max_model_len, args.load_format) == (0.85, 4096, "safetensors")
    assert (ns.uvicorn_log_level, ns.enable_log_requests, ns.disable_log_requests) == ("warning", True, True)
    ns = _parse("serve", "--allowed-origins", '["https://a.example", "http://b.example:3000"]')
    assert ns.allowed_origins == ["https://a.example", "http://b.example:3000"] and ns.allowed_methods == [
        "*"
    ]
    assert _parse("serve", "--allowed-origins", "https://a.example,https://c.example").allowed_origins == [
        "https://a.example",
        "https://c.example",
    ]
    assert _parse("serve").allowed_origins is None  # no CORS unless asked


def test_a_bad_origin_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parse("serve", "--allowed-origins", '["https://a.example"')
    assert "--allowed-origins: not a JSON list" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, size", [("1024", 1024), ("512MiB", 512 << 20), ("4GiB", 4 << 30), ("2G", 2 << 30)]
)
def test_parse_size(text, size):
    assert parse_size(text) == size


def test_parse_size_rejects_garbage():
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_parse(path):
    ns = _parse("serve", "--config", str(path))
    args = engine_args_from(ns)
    assert args.dtype in ("float32", "bfloat16")
    assert ns.port == 8000


def test_config_values_and_command_line_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tensor-parallel-size: 2\nmax_num_seqs: 8\nkv-cache-memory: 64MiB\nport: 9000\n")
    ns = _parse("serve", "--config", str(cfg), "--port", "9100")
    args = engine_args_from(ns)
    assert (args.tensor_parallel_size, args.max_num_seqs, args.kv_cache_memory) == (2, 8, 64 << 20)
    assert ns.port == 9100  # the command line wins over the file


def test_config_unknown_key_is_an_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tensor-parallel-sise: 2\n")
    with pytest.raises(SystemExit):
        _parse("serve", "--config", str(cfg))
    assert "unknown setting 'tensor-parallel-sise'" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_one_shot(tiny_model_dir):
    from distgen import LLM, SamplingParams

    model = tiny_model_dir("llama")
    cmd = [sys.executable, "-m", "distgen.entrypoints.cli", "generate", "Once upon a time", "--model", model]
    cmd += ["--max-tokens", "6", "--temperature", "0", "--kv-cache-memory", "16MiB", "--dtype", "float32"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    llm = LLM(model, kv_cache_memory=16 << 20, dtype="float32")
    want = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
    assert res.stdout == "Once upon a time" + want[0].outputs[0].text + "\n"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["serve", "/nonexistent/model"], "model '/nonexistent/model' not found"),
        (["serve", "-tp", "10"], "tensor_parallel_size=10 does not fit the model: it has 9 attention heads"),
        (["serve", "--kv-cache-memory", "lots"], "not a size"),
        (["serve", "--port", "99999"], "not a TCP port"),
        (["serve", "--max-model-len", "0"], "max_model_len must be an integer >= 1, got 0"),
        (["serve", "--device", "tpu"], "device must be 'cpu' or 'cuda', got 'tpu'"),
        (["serve", "--enable-auto-tool-choice"], "--enable-auto-tool-choice needs --tool-call-parser"),
        (["serve", "--tool-call-parser", "pythonic"], "invalid choice: 'pythonic'"),
        (["serve", "--shutdown-timeout", "-1"], "--shutdown-timeout must be >= 0 seconds, got -1.0"),
        (["serve", "--shutdown-timeout", "nan"], "--shutdown-timeout must be >= 0 seconds, got nan"),
        pytest.param(
            ["serve", "--device", "cuda"],
            "torch sees no CUDA GPU here",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_serve_invocations_fail_with_one_clear_line(argv, needle):
    res = subprocess.run(
        [sys.executable, "-m", "distgen.entrypoints.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_a_port_in_use_fails_before_the_model_loads():
    """The socket is bound first: no engine starts (seconds to minutes of loading) for a server that
    could never listen."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "distgen.entrypoints.cli", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert res.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr and "Traceback" not in res.stderr
    assert "engine core" not in res.stderr  # nothing was started


def test_vllm_flags_of_the_serve_command():
    """serve --model, and the engine flags that take JSON or vLLM's byte units."""
    ns = _parse("serve", "--model", "some/model", "--kv-cache-memory-bytes", "2G")
    assert ns.model == "some/model"
    args = engine_args_from(ns)
    assert args.model == "some/model" and args.kv_cache_memory_bytes == 2 << 30
    ns = _parse(
        "serve",
        "m",
        "--override-generation-config",
        '{"temperature": 0.5}',
        "--hf-overrides",
        '{"rope_scaling": {"factor": 2.0}}',
        "--response-role",
        "bot",
        "--return-tokens-as-token-ids",
        "--max-log-len",
        "40",
        "--enable-prompt-tokens-details",
        "--root-path",
        "/api",
    )
    args = engine_args_from(ns)
    assert args.override_generation_config == {"temperature": 0.5}
    assert args.hf_overrides == {"rope_scaling": {"factor": 2.0}}
    assert (ns.response_role, ns.return_tokens_as_token_ids, ns.max_log_len) == ("bot", True, 40)
    assert (ns.enable_prompt_tokens_details, ns.root_path) == (True, "/api")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["serve", "a", "--model", "b"], "two models given: 'a' and --model 'b'"),
        (["serve", "--hf-overrides", "[1]"], "not a JSON object"),
        (["serve", "--override-generation-config", "{temperature"], "not JSON"),
        (["serve", "--kv-cache-memory-bytes", "lots"], "not a size"),
        (["serve", "--ssl-keyfile", "/nonexistent.key"], "--ssl-keyfile and --ssl-certfile go together"),
    ],
)
def test_bad_vllm_flags_fail_with_one_clear_line(argv, needle):
    res = subprocess.run(
        [sys.executable, "-m", "distgen.entrypoints.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert res.returncode != 0
    assert needle in res.stderr, res.stderr[-1500:]
