"""``distgen serve``'s own flags (the server's, beside the engine's), and the names of those that
make its :class:`~distgen.entrypoints.openai.api_server.ServerArgs`."""

from __future__ import annotations

import argparse
import json

from distgen.entrypoints.openai.reasoning_parsers import REASONING_PARSERS
from distgen.entrypoints.openai.tool_parsers import PARSERS

SERVER_KEYS = (
    "host",
    "port",
    "api_key",
    "chat_template",
    "log_level",
    "enable_auto_tool_choice",
    "tool_call_parser",
    "reasoning_parser",
    "enable_log_requests",
    "disable_log_requests",
    "uvicorn_log_level",
    "allowed_origins",
    "allowed_methods",
    "allowed_headers",
    "allow_credentials",
    "shutdown_timeout",
    "max_request_body_size",
    "exit_on_engine_death",
    "response_role",
    "return_tokens_as_token_ids",
    "max_log_len",
    "enable_prompt_tokens_details",
    "root_path",
    "ssl_keyfile",
    "ssl_certfile",
)


def _string_list(text: str | list) -> list[str]:
    """A JSON list of strings, as vLLM takes them (``'["https://a.example"]'``), or comma-separated."""
    if isinstance(text, str):
        try:
            text = json.loads(text) if text.lstrip().startswith("[") else [t.strip() for t in text.split(",")]
        except json.JSONDecodeError as e:
            raise argparse.ArgumentTypeError(f"not a JSON list: {e}") from None
    if not isinstance(text, list) or not all(isinstance(t, str) and t for t in text):
        raise argparse.ArgumentTypeError(f"not a list of strings: {text!r}")
    return text


def _port(text: str | int) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {text!r} (0-65535; 0 picks a free one)")
    return port


def add_server_args(serve: argparse.ArgumentParser, parse_size) -> None:
    """The server group of ``distgen serve``'s flags."""
    net = serve.add_argument_group("server")
    net.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    net.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    net.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: $DISTGEN_API_KEY)"
    )
    net.add_argument(
        "--chat-template", dest="chat_template", default=None, help="Jinja template file or string"
    )
    net.add_argument("--log-level", dest="log_level", default="info", help="debug | info | warning | error")
    net.add_argument(
        "--uvicorn-log-level",
        dest="uvicorn_log_level",
        default=None,
        help="uvicorn's own (default: --log-level)",
    )
    cors = "CORS (off unless --allowed-origins is given): "
    for what, default, about in (
        (
            "origins",
            None,
            "origins whose browser pages may call the API, a JSON list or comma-separated ('*': any)",
        ),
        ("methods", ["*"], "methods"),
        ("headers", ["*"], "headers"),
    ):
        net.add_argument(
            f"--allowed-{what}",
            dest=f"allowed_{what}",
            type=_string_list,
            default=default,
            metavar="LIST",
            help=cors + about,
        )
    net.add_argument(
        "--allow-credentials", dest="allow_credentials", action="store_true", help=cors + "allow credentials"
    )
    net.add_argument(
        "--exit-on-engine-death",
        dest="exit_on_engine_death",
        action="store_true",
        help="exit (status 1) once the engine is dead, as vLLM does, for a supervisor that restarts on "
        "exit; by default the server stays up answering 503",
    )
    _add_http_args(net, parse_size)
    _add_api_args(net)


def _add_http_args(net, parse_size) -> None:
    """Where and how the HTTP server listens: its path prefix, TLS, body size and shutdown."""
    net.add_argument(
        "--root-path",
        dest="root_path",
        default="",
        help="the path prefix a reverse proxy serves the API under (FastAPI's root_path)",
    )
    net.add_argument("--ssl-keyfile", dest="ssl_keyfile", default=None, help="serve HTTPS with this key")
    net.add_argument(
        "--ssl-certfile", dest="ssl_certfile", default=None, help="... and this certificate (PEM)"
    )
    net.add_argument(
        "--max-request-body-size",
        dest="max_request_body_size",
        type=parse_size,
        default=32 << 20,
        metavar="SIZE",
        help="answer request bodies larger than this 413 without reading them (default 32MiB; 0: no limit)",
    )
    net.add_argument(
        "--shutdown-timeout",
        dest="shutdown_timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="on Ctrl-C or SIGTERM, let the requests in flight run on this long before ending them "
        "(default 0: at once, as vLLM); a second Ctrl-C stops at once",
    )


def _add_api_args(net) -> None:
    """How requests are answered and logged: roles, logprobs, usage, tools, limits."""
    net.add_argument(
        "--response-role",
        dest="response_role",
        default="assistant",
        help="the role a chat reply speaks as when the request adds a generation prompt (default: assistant)",
    )
    net.add_argument(
        "--return-tokens-as-token-ids",
        dest="return_tokens_as_token_ids",
        action="store_true",
        help="logprobs name each token 'token_id:N' (tokens that are not valid UTF-8 alone stay exact)",
    )
    net.add_argument(
        "--max-log-len",
        dest="max_log_len",
        type=int,
        default=None,
        metavar="N",
        help="characters of a prompt shown in the request log (default: all)",
    )
    net.add_argument(
        "--enable-prompt-tokens-details",
        dest="enable_prompt_tokens_details",
        action="store_true",
        help="usage gives prompt_tokens_details.cached_tokens: prompt tokens found in the prefix cache",
    )
    net.add_argument(
        "--enable-log-requests",
        dest="enable_log_requests",
        action="store_true",
        help="log each request (id, prompt, sampling parameters) at INFO",
    )
    net.add_argument(
        "--disable-log-requests",
        dest="disable_log_requests",
        action="store_true",
        help="vLLM's older flag; requests are not logged unless --enable-log-requests",
    )
    net.add_argument(
        "--enable-auto-tool-choice",
        dest="enable_auto_tool_choice",
        action="store_true",
        help="serve tool_choice 'auto': calls are read out of the model's text by --tool-call-parser",
    )
    net.add_argument(
        "--tool-call-parser",
        dest="tool_call_parser",
        default=None,
        choices=sorted(PARSERS),
        help="how the model writes tool calls: hermes (Qwen2.5, Qwen3, Hermes), llama3_json (Llama 3.1+)",
    )
    net.add_argument(
        "--reasoning-parser",
        dest="reasoning_parser",
        default=None,
        choices=sorted(REASONING_PARSERS),
        help="split the model's <think> block off as reasoning_content: qwen3 (Qwen3, QwQ), deepseek_r1",
    )
