"""The FastAPI app: OpenAI's routes (completions, chat, responses, models) plus /health, /ping,
/load, /metrics, /tokenize, /detokenize and /version."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import distgen
from distgen.entrypoints.chat_utils import load_chat_template
from distgen.entrypoints.openai.body_limit import BodyLimit
from distgen.entrypoints.openai.errors import OpenAIError, error_response
from distgen.entrypoints.openai.metrics import PrometheusStatLogger
from distgen.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from distgen.entrypoints.openai.reasoning_parsers import check_reasoning_parser
from distgen.entrypoints.openai.serving_chat import create_chat_completion, render_request
from distgen.entrypoints.openai.serving_common import ServingContext, now
from distgen.entrypoints.openai.serving_completion import create_completion
from distgen.entrypoints.openai.serving_responses import ResponsesRequest, ResponseStore, create_response
from distgen.entrypoints.openai.tool_parsers import PARSERS
from distgen.envs import envs
from distgen.exceptions import EngineDeadError
from distgen.frontend.args import EngineArgs
from distgen.frontend.async_llm import AsyncLLM
from distgen.frontend.stats import LoggingStatLogger

logger = logging.getLogger("distgen")


@dataclass
class ServerArgs:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    chat_template: str | None = None
    log_level: str = "info"
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    enable_log_requests: bool = False  # one INFO line per request: its id, prompt and parameters
    disable_log_requests: bool = False  # vLLM's older flag: requests are not logged unless enabled
    uvicorn_log_level: str | None = None  # uvicorn's own log level (default: log_level)
    # CORS, for pages in a browser that call the API: off unless origins are given (vLLM allows every
    # origin by default, which lets any web page a user opens drive a server on their machine).
    allowed_origins: list[str] | None = None
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    # On Ctrl-C or SIGTERM: how long the requests in flight may run on before they are ended (with a
    # 503, or an error event in their stream). 0, vLLM's default: at once. New connections are refused.
    shutdown_timeout: float = 0.0
    # Request bodies over this many bytes are answered 413 unread (0: no limit). A prompt that could
    # fit the context is far smaller; vLLM sets no limit, which lets one client stall the server.
    max_request_body_size: int = 32 << 20
    response_role: str = "assistant"  # the role a chat reply speaks as, when the prompt asks for a reply
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    max_log_len: int | None = None  # characters of a prompt in the request log (None: all)
    enable_prompt_tokens_details: bool = False  # usage.prompt_tokens_details.cached_tokens
    root_path: str = ""  # the path prefix a proxy serves the app under (ASGI root_path)
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    # Once the engine is dead (its core gone, or workers lost past the restart budget): exit with
    # status 1, as vLLM does, for a supervisor that restarts on exit; otherwise answer 503 meanwhile.
    exit_on_engine_death: bool = False

    def __post_init__(self) -> None:
        check_reasoning_parser(self.reasoning_parser)
        if (self.ssl_keyfile is None) != (self.ssl_certfile is None):
            raise ValueError("--ssl-keyfile and --ssl-certfile go together: give both or neither")
        for path in (self.ssl_keyfile, self.ssl_certfile):
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"SSL file {path!r} not found")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"--max-log-len must be >= 0, got {self.max_log_len}")
        if self.max_request_body_size < 0:
            raise ValueError(f"--max-request-body-size must be >= 0, got {self.max_request_body_size}")
        if not self.shutdown_timeout >= 0:  # NaN too
            raise ValueError(f"--shutdown-timeout must be >= 0 seconds, got {self.shutdown_timeout}")
        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            raise ValueError(
                f"unknown tool call parser {self.tool_call_parser!r}; there are: {', '.join(PARSERS)}"
            )
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError(f"--enable-auto-tool-choice needs --tool-call-parser ({' | '.join(PARSERS)})")


def build_app(engine: AsyncLLM, server: ServerArgs, served_model_names: list[str]) -> FastAPI:
    metrics = PrometheusStatLogger(served_model_names[0])
    engine.stat_loggers.append(metrics)
    ctx = _serving_context(engine, server, served_model_names)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="distgen", version=distgen.__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    _add_middleware(app, server)
    _add_error_handlers(app)
    _add_info_routes(app, engine, ctx, metrics, served_model_names)
    _add_generation_routes(app, engine, ctx)
    _add_token_routes(app, engine, ctx)
    return app


def _serving_context(engine: AsyncLLM, server: ServerArgs, served_model_names: list[str]) -> ServingContext:
    return ServingContext(
        engine,
        served_model_names,
        load_chat_template(server.chat_template),
        server.tool_call_parser if server.enable_auto_tool_choice else None,
        server.reasoning_parser,
        log_requests=server.enable_log_requests and not server.disable_log_requests,
        response_role=server.response_role,
        return_tokens_as_token_ids=server.return_tokens_as_token_ids,
        max_log_len=server.max_log_len,
        enable_prompt_tokens_details=server.enable_prompt_tokens_details,
    )


def _add_middleware(app: FastAPI, server: ServerArgs) -> None:
    """The API key check on /v1, the body size limit and CORS. Each middleware added wraps the ones
    before it, so CORS, added last, answers a preflight before the key is asked for."""
    api_key = server.api_key or envs().api_key

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 7235: "bearer" is "Bearer"); the key is not.
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), api_key.encode()):
                return error_response("invalid or missing API key (Authorization: Bearer ...)", 401)
        return await call_next(request)

    app.add_middleware(BodyLimit, limit=server.max_request_body_size)
    if server.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.allowed_origins,
            allow_methods=server.allowed_methods,
            allow_headers=server.allowed_headers,
            allow_credentials=server.allow_credentials,
        )


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, request validation, a dead engine, a ValueError, and
    Starlette's own (an unknown path, a wrong method)."""

    @app.exception_handler(OpenAIError)
    async def openai_error(_: Request, e: OpenAIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        if first.get("type") == "value_error":  # our validators' own words, without "Value error, "
            msg = str(first.get("ctx", {}).get("error", msg))
        if not where and first.get("type") == "model_attributes_type":
            msg = "the request body must be a JSON object"
        return error_response(f"{where}: {msg}" if where else msg, 400, where or None)

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, e: EngineDeadError):
        return error_response(str(e), 503)

    @app.exception_handler(ValueError)
    async def value_error(_: Request, e: ValueError):
        return OpenAIError.from_value_error(e).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """An unknown path or a wrong method: OpenAI's error shape, as every other error here."""
        what = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed here"}
        return error_response(what.get(e.status_code, str(e.detail)), e.status_code)


def _add_generation_routes(app: FastAPI, engine: AsyncLLM, ctx: ServingContext) -> None:
    """/v1/completions, /v1/chat/completions and /v1/responses."""

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request):
        _check_alive(engine)
        return await create_completion(ctx, req, raw)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request):
        _check_alive(engine)
        return await create_chat_completion(ctx, req, raw)

    responses = ResponseStore()

    @app.post("/v1/responses")
    async def create_responses(req: ResponsesRequest, raw: Request):
        _check_alive(engine)
        return await create_response(ctx, responses, req, raw)


def _add_token_routes(app: FastAPI, engine: AsyncLLM, ctx: ServingContext) -> None:
    """/tokenize (a prompt or a conversation) and /detokenize."""

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            chat = ChatCompletionRequest(
                messages=req.messages, add_generation_prompt=req.add_generation_prompt
            )
            text = await render_request(ctx, chat)
            ids = await ctx.encode(text, add_special_tokens=False, param="messages")
        else:
            ids = await ctx.encode(req.prompt, req.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        ctx.check_model(req.model)
        vocab = engine.config.model.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(f"token id {bad} is out of the vocabulary range [0, {vocab})", param="tokens")
        return {"prompt": engine.tokenizer.decode(req.tokens)}


def _add_info_routes(
    app: FastAPI,
    engine: AsyncLLM,
    ctx: ServingContext,
    metrics: PrometheusStatLogger,
    served_model_names: list[str],
) -> None:
    """Health (/health, /ping), load, version, metrics and the models list."""

    @app.get("/health")
    async def health() -> Response:
        """503 once the engine is dead, and while lost workers are being replaced."""
        stats = engine.last_stats
        recovering = stats is not None and stats.recovering
        return Response(status_code=503 if engine.errored or recovering else 200)

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # SageMaker's health check, as vLLM serves it
        return await health()

    @app.get("/load")
    async def load() -> dict:
        """Requests in flight (queued or running), for a router that balances by load."""
        return {"server_load": engine.num_in_flight}

    @app.get("/version")
    async def version() -> dict:
        return {"version": distgen.__version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": now(),
            "owned_by": "distgen",
            "root": engine.config.model.model,
            "max_model_len": engine.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(name) for name in served_model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:  # OpenAI's "retrieve model" (client.models.retrieve)
        return card(ctx.check_model(model))


def _check_alive(engine: AsyncLLM) -> None:
    if engine.errored:
        raise EngineDeadError("the engine is dead: the engine core process is gone")


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads: a port in use fails at once, not after the
    engine has started, and port 0 becomes the free port the kernel picked."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    return sock


def _draining_server(config, engine: AsyncLLM, drain_s: float):
    """uvicorn's server, whose shutdown (the first Ctrl-C or SIGTERM) stops accepting connections,
    lets the requests in flight run on for ``drain_s`` seconds, then ends them. uvicorn alone waits
    for them however long they take. A second Ctrl-C stops at once, as with uvicorn."""
    import uvicorn

    def end_requests() -> None:
        if n := engine.end_all(EngineDeadError("the server is shutting down")):
            logger.info("shutting down: ended %d request(s) still in flight after %gs", n, drain_s)

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            timer = asyncio.get_running_loop().call_later(drain_s, end_requests)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    return Server(config)


def serve(engine_args: EngineArgs, server: ServerArgs) -> None:
    """Load the model, then serve until Ctrl-C / SIGTERM; the engine core stops with the server."""
    import uvicorn

    sock = listen_socket(server.host, server.port)
    try:
        engine = AsyncLLM.from_engine_args(engine_args)
        try:
            if not engine_args.disable_log_stats:
                engine.stat_loggers.append(LoggingStatLogger())
            names = [engine.config.model.served_model_name]
            app = build_app(engine, server, names)
            config = uvicorn.Config(
                app,
                log_level=server.uvicorn_log_level or server.log_level,
                root_path=server.root_path,
                ssl_keyfile=server.ssl_keyfile,
                ssl_certfile=server.ssl_certfile,
            )
            port = sock.getsockname()[1]
            scheme = "https" if server.ssl_certfile else "http"
            logger.info("serving %s on %s://%s:%d%s", names[0], scheme, server.host, port, server.root_path)
            uv = _draining_server(config, engine, server.shutdown_timeout)
            asyncio.run(_serve_until(uv, sock, engine if server.exit_on_engine_death else None))
            if server.exit_on_engine_death and engine.errored:
                raise SystemExit("distgen serve: the engine is dead (--exit-on-engine-death): exiting")
        finally:
            engine.shutdown()
    finally:
        sock.close()


async def _serve_until(uv, sock: socket.socket, engine: AsyncLLM | None) -> None:
    """Serve; with ``engine`` given, stop (as Ctrl-C does) once it is dead."""

    async def watch() -> None:
        while not uv.should_exit:
            await asyncio.sleep(0.25)
            if engine is not None and engine.errored:
                logger.error("the engine is dead: stopping the server (--exit-on-engine-death)")
                uv.should_exit = True

    watcher = asyncio.create_task(watch())
    try:
        await uv.serve(sockets=[sock])
    finally:
        watcher.cancel()
