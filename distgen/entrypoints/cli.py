"""The ``distgen`` command: ``serve`` (the OpenAI-compatible server) and ``generate`` (one offline run).

Engine flags are EngineArgs' fields with dashes (vLLM's names); ``--config FILE.yaml`` supplies
defaults for any of them (keys with dashes or underscores), and flags on the command line win.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import sys
from typing import TYPE_CHECKING, Any

import yaml

from distgen.entrypoints import collect_env
from distgen.entrypoints.bench import add_bench_command, run_bench
from distgen.entrypoints.client_cli import add_client_commands, run_client
from distgen.entrypoints.run_batch import add_run_batch_command, run_batch
from distgen.entrypoints.server_flags import SERVER_KEYS, add_server_args
from distgen.signals import catchable_ctrl_c

logger = logging.getLogger("distgen")

if TYPE_CHECKING:
    from distgen.frontend.args import EngineArgs

MODEL_HELP = "HF directory, .gguf file, or hub id org/name[:file.gguf], fetched if absent (default: SmolLM2)"
ENGINE_HELP = {
    "tokenizer": "tokenizer directory or hub id, if not the model's",
    "dtype": "auto | float32 | bfloat16 | float16 (auto: float32 on the CPU, the checkpoint's on CUDA)",
    "seed": "seed for requests that carry none",
    "max_model_len": "longest sequence, prompt plus output (default: the model's limit)",
    "tensor_parallel_size": "tensor-parallel ranks, 1 to the number of attention heads",
    "data_parallel_size": "engine replicas, each with --tensor-parallel-size ranks; a request goes to the "
    "least loaded one",
    "distributed_executor_backend": "uni | mp | ray (default: uni for one rank, mp for more, "
    "ray inside a connected Ray cluster)",
    "block_size": "tokens per KV cache block",
    "kv_cache_memory": "KV cache size per rank on the CPU, bytes or with a unit (512MiB, 4GiB)",
    "kv_cache_memory_bytes": "vLLM's name for the KV cache size: bytes, or 4G (GiB) / 4g (10^9), as vLLM "
    "reads it",
    "override_generation_config": "JSON of generation_config keys over the model's, e.g. "
    "'{\"temperature\": 0.5}' (alone with --generation-config vllm)",
    "max_worker_restarts": "lost workers (dead, raising, or silent past --worker-step-timeout-s) are "
    "replaced and their requests recomputed, this many times per --worker-restart-window-s; 0: a lost "
    "worker ends every request",
    "worker_restart_window_s": "the window of --max-worker-restarts, in seconds",
    "worker_step_timeout_s": "a worker silent this long in a step is lost (hung or stopped)",
    "hf_overrides": "JSON of config.json keys to replace before the model loads, e.g. "
    "'{\"max_position_embeddings\": 4096}' (nested objects are merged)",
    "gpu_memory_utilization": "fraction of GPU memory for weights plus KV cache",
    "enable_prefix_caching": "share KV blocks between requests with a common prompt prefix",
    "num_gpu_blocks_override": "force the number of KV cache blocks",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget of one step",
    "enable_chunked_prefill": "split long prompts across steps",
    "generation_config": "auto (the model's generation_config.json) | distgen | vllm (ignore it) | a path",
    "served_model_name": "the model name the server answers to (default: the model argument)",
    "device": "cpu | cuda (default: cuda when available)",
    "enforce_eager": "on CUDA, never replay captured CUDA graphs",
    "async_scheduling": "schedule the next step while the GPU runs this one",
    "disable_log_stats": "serve: no line of engine stats (throughput, queues, KV cache) every 10 s",
    "trust_remote_code": "vLLM's; no effect: no model code is loaded, only built-in architectures run",
    "runner": "auto | generate (what auto resolves to: every architecture distgen serves is generative); "
    "vLLM's pooling and draft are refused",
    "convert": "auto | none; vLLM's embed, classify and reward (pooling models) are refused",
    "revision": "the branch, tag or commit of a hub model (default: main)",
    "download_dir": "where hub models are downloaded (default: the Hugging Face cache, $HF_HUB_CACHE)",
    "load_format": "auto | safetensors | gguf (must match what MODEL holds)",
    "tokenizer_mode": "auto | hf: the model's own tokenizer",
    "quantization": "vLLM's; refused: weights load in --dtype (a GGUF file is dequantized)",
    "kv_cache_dtype": "auto only: the KV cache holds the model's dtype",
    "pipeline_parallel_size": "pipeline stages, each a contiguous range of layers on tp workers; 1 to the "
    "number of layers (Llama, Mistral, Qwen2, Qwen3)",
    "swap_space": "vLLM's; no effect: a preempted request is recomputed, never swapped",
    "disable_custom_all_reduce": "vLLM's; no effect: all-reduce is NCCL's (gloo's on the CPU)",
    "scheduling_policy": "fcfs (arrival order) | priority (each request's priority, lower first, "
    "then arrival; the least urgent running request is preempted first)",
    "max_logprobs": "most logprobs / prompt_logprobs a request may ask for per token",
    "cpu_omp_threads_bind": "CPU workers' OpenMP threads: auto (one per physical core, pinned, split "
    "between the workers of a machine) | nobind | CPU lists per worker, 0-3|4-7 "
    "(default: $DISTGEN_CPU_OMP_THREADS_BIND, else auto)",
}
_ALIASES = {
    "tensor_parallel_size": ["-tp", "--tp"],
    "pipeline_parallel_size": ["-pp", "--pp"],
    "data_parallel_size": ["-dp", "--dp"],
}
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
}
_UNITS.update({"kb": 1000, "mb": 10**6, "gb": 10**9})


def parse_size(text: str | int) -> int:
    """Bytes from ``1073741824``, ``512MiB``, ``4GiB``, ``2G``."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use bytes or a unit: 512MiB, 4GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    from distgen.frontend.args import EngineArgs  # torch: loaded here, where Ctrl-C is caught

    group = parser.add_argument_group("engine")
    defaults = EngineArgs()
    for f in dataclasses.fields(EngineArgs):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = ENGINE_HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            group.add_argument(
                flag,
                *_ALIASES.get(f.name, []),
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        kind = _field_type(f.name, default)
        shown = "" if default is None else f" (default: {default})"
        group.add_argument(
            flag,
            *_ALIASES.get(f.name, []),
            dest=f.name,
            type=kind,
            default=default,
            metavar=_METAVARS.get(kind, f.name.split("_")[-1].upper()),
            help=help_text + shown,
        )


def _human_bytes(text: str) -> int:
    from distgen.config import human_readable_bytes

    try:
        return human_readable_bytes(text)
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _json_object(text: str | dict) -> dict:
    """A JSON object given on the command line (or a mapping from a YAML config)."""
    if isinstance(text, dict):
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text!r}")
    return value


def _field_type(name: str, default: Any):
    if name == "kv_cache_memory":
        return parse_size
    if name == "kv_cache_memory_bytes":
        return _human_bytes
    if name in ("override_generation_config", "hf_overrides"):
        return _json_object
    if name in ("max_model_len", "num_gpu_blocks_override", "max_num_batched_tokens", "seed", "block_size"):
        return int
    if isinstance(default, float):
        return float
    if isinstance(default, int):
        return int
    return str


_METAVARS: dict[Any, str] = {
    int: "N",
    float: "X",
    parse_size: "SIZE",
    _json_object: "JSON",
    _human_bytes: "SIZE",
}


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    from distgen.frontend.args import EngineArgs

    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    import distgen

    parser = argparse.ArgumentParser(
        prog="distgen",
        description="distgen: LLM inference with tensor parallelism and vLLM's API.",
        epilog="Run `distgen COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"distgen {distgen.__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{serve,generate,chat,complete,run-batch,bench,collect-env}"
    )

    serve = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible HTTP server",
        description="Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /ping, /load, /metrics, /tokenize, /detokenize, /version).",
    )
    serve.add_argument("model", nargs="?", default=None, help=MODEL_HELP)
    serve.add_argument(
        "--model", dest="model_flag", metavar="MODEL", default=None, help="the model, as vLLM also takes it"
    )
    serve.add_argument("--config", metavar="YAML", help="defaults for any flag below, read from a YAML file")
    add_server_args(serve, parse_size)
    add_engine_args(serve)

    gen = sub.add_parser(
        "generate",
        help="generate a completion for one prompt, offline",
        description="Load MODEL, generate for PROMPT, print the text and exit.",
    )
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", default=None, help=MODEL_HELP)
    gen.add_argument("--config", metavar="YAML", help="defaults for any flag below, read from a YAML file")
    gen.add_argument("--max-tokens", dest="max_tokens", type=int, default=16, help="tokens to generate")
    gen.add_argument("--temperature", type=float, default=None, help="default: the model's, else 1.0")
    gen.add_argument("--top-p", dest="top_p", type=float, default=None)
    gen.add_argument("--top-k", dest="top_k", type=int, default=None)
    gen.add_argument("--n", type=int, default=1, help="completions to generate")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt as a user message (chat template)")
    add_engine_args(gen)
    add_client_commands(sub)
    add_run_batch_command(sub, add_engine_args, MODEL_HELP)
    sub.add_parser("collect-env", help="print the machine and software versions, for a bug report")
    add_bench_command(sub, add_engine_args, MODEL_HELP)
    return parser


def _apply_config(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    return _with_model_flag(parser, _with_yaml_defaults(parser, argv))


def _with_model_flag(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> argparse.Namespace:
    """``serve --model M`` (vLLM takes the model either way) as the positional MODEL."""
    flag = getattr(ns, "model_flag", None)
    if flag is not None:
        if ns.model is not None and ns.model != flag:
            parser.error(f"two models given: {ns.model!r} and --model {flag!r}")
        ns.model = flag
    return ns


def _with_yaml_defaults(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    ns = parser.parse_args(argv)
    path = getattr(ns, "config", None)
    if not path:
        return ns
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        parser.error(f"{path}: expected a mapping of flag names to values")
    sub = parser._subparsers._group_actions[0].choices[ns.command]  # type: ignore[union-attr]
    known = {a.dest: a for a in sub._actions}
    defaults = {}
    for key, value in cfg.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            parser.error(f"{path}: unknown setting {key!r}")
        action = known[dest]
        defaults[dest] = action.type(value) if action.type is not None and value is not None else value
    sub.set_defaults(**defaults)
    return parser.parse_args(argv)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # not KeyboardInterrupt: see distgen.signals.Interrupted


def main(argv: list[str] | None = None) -> None:
    # SIGTERM unwinds like Ctrl-C, so one that arrives while the model loads (before uvicorn has
    # handlers of its own) still stops the engine core and its workers instead of leaving them to
    # notice their parent is gone.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    catchable_ctrl_c()  # a Ctrl-C caught below exits 0 wherever it landed, not by SIGINT at exit
    try:  # Ctrl-C while torch loads (the parser reads EngineArgs): a quiet exit, not a traceback
        parser = build_parser()
    except KeyboardInterrupt:
        return
    ns = _apply_config(parser, sys.argv[1:] if argv is None else argv)
    logging.basicConfig(format="%(levelname)s %(asctime)s %(message)s", level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request of a hub download
    try:
        if ns.command == "serve":
            from distgen.entrypoints.openai.api_server import ServerArgs, serve

            server = ServerArgs(**{k: getattr(ns, k) for k in SERVER_KEYS})
            logging.getLogger("distgen").setLevel(server.log_level.upper())
            serve(engine_args_from(ns), server)
        elif ns.command == "generate":
            _generate(ns)
        elif ns.command in ("chat", "complete"):
            run_client(ns)
        elif ns.command == "run-batch":
            args = engine_args_from(ns)
            if run_batch(args, ns.input_file, ns.output_file, ns.max_concurrency)["failed"]:
                logger.warning("run-batch: some requests failed; their errors are in %s", ns.output_file)
        elif ns.command == "collect-env":
            collect_env.main()
        elif ns.command == "bench":
            run_bench(ns, engine_args_from)
    except KeyboardInterrupt:
        pass
    except (ValueError, TypeError, OSError, NotImplementedError, RuntimeError) as e:
        # Bad flags, a model that cannot load, workers that cannot start: one line, no traceback.
        sys.exit(f"distgen {ns.command}: error: {e}")


def _generate(ns: argparse.Namespace) -> None:
    from distgen import LLM, SamplingParams

    logging.getLogger("distgen").setLevel(logging.WARNING)
    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    try:
        params = llm.get_default_sampling_params()
        for key in ("temperature", "top_p", "top_k"):
            if getattr(ns, key) is not None:
                setattr(params, key, getattr(ns, key))
        params = SamplingParams(**{**dataclasses.asdict(params), "max_tokens": ns.max_tokens, "n": ns.n})
        if ns.chat:
            outs = llm.chat([{"role": "user", "content": ns.prompt}], params, use_tqdm=False)
        else:
            outs = llm.generate(ns.prompt, params, use_tqdm=False)
        for c in outs[0].outputs:
            print(c.text if ns.chat else ns.prompt + c.text)
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
