"""The OpenAI-compatible HTTP server: `python -m frontend.api_server [flags]` (scripts/launch.sh).

    client ──HTTP/SSE──▶ aiohttp app (this process: tokenization, chat template, detokenization)
                           └─ AsyncLLM ──ZeroMQ──▶ scheduler process ──▶ worker process per rank

Life cycle (serve): start the engine, then listen, print the URL, and wait for either
  - SIGTERM / Ctrl-C: stop listening, let in-flight requests finish for up to --shutdown-timeout
    seconds (then cancel them), stop the engine, exit 0 (a second signal skips the wait); or
  - the engine's death: open streams end with an error event and [DONE] (AsyncLLM fails them),
    /health answers 503, then the same shutdown and exit 1.
Every child dies with this process in any case (PR_SET_PDEATHSIG, ipc/process.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import signal
import sys
from dataclasses import dataclass
from importlib import metadata

import uvloop
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from frontend.cli_args import ServerConfig, make_arg_parser
from frontend.engine_args import EngineArgs
from frontend.metrics import CONTENT_TYPE, ServerMetrics
from frontend.protocol import ApiError, bad_request, check_token_ids, parse_chat
from frontend.serving import OpenAIServing, error_response, json_response, now
from frontend.serving_chat import OpenAIServingChat
from frontend.serving_completions import OpenAIServingCompletion
from ipc import envs
from ipc.process import freeze_start_up_objects

logger = logging.getLogger("pagedserve.api_server")

MAX_BODY_BYTES = 32 << 20
"""Largest request body accepted (413 beyond; a declared Content-Length is refused before reading)."""
_HEALTH_POLL_S = 0.2
_DEATH_FLUSH_S = 0.5  # lets open streams write their error event before the listener closes


@dataclass
class _Stop:
    """Why serving ends: a signal (graceful) or the engine's death."""

    requested: asyncio.Event
    forced: asyncio.Event
    engine_dead: bool = False


def main(argv: list[str] | None = None) -> int:
    args = make_arg_parser().parse_args(argv)
    logging.basicConfig(level=envs.log_level(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine_args, server = split_args(args)
    except ValueError as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 2
    return uvloop.run(serve(engine_args, server))


def split_args(args: argparse.Namespace) -> tuple[EngineArgs, ServerConfig]:
    values = vars(args)
    engine = EngineArgs(**{f.name: values[f.name] for f in dataclasses.fields(EngineArgs) if f.name in values})
    server = ServerConfig(**{f.name: values[f.name] for f in dataclasses.fields(ServerConfig)})
    return engine, server


async def serve(engine_args: EngineArgs, server: ServerConfig) -> int:
    """Run until a signal or the engine's death; returns the exit code."""
    from frontend.async_llm import AsyncLLM

    stop = _Stop(asyncio.Event(), asyncio.Event())
    # Ctrl-C in a terminal signals the whole process group. The engine's children inherit an ignored
    # SIGINT (Python keeps it ignored), so only this process reacts, and drains, then stops them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        llm = AsyncLLM(engine_args)
    except (OSError, ValueError) as e:
        print(f"pagedserve: error: {e}", file=sys.stderr)
        return 1
    _install_signal_handlers(stop)
    try:
        if not await _start_engine(llm, stop):
            return 0 if not stop.engine_dead else 1
        return await _serve_http(llm, server, stop)
    finally:
        await llm.shutdown()


def _install_signal_handlers(stop: _Stop) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.requested.is_set():
            stop.forced.set()
            return
        print(f"pagedserve: {signal.Signals(signum).name}: finishing in-flight requests, then exiting",
              file=sys.stderr, flush=True)
        stop.requested.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


async def _start_engine(llm, stop: _Stop) -> bool:
    """Start the engine unless a signal comes first; False if it did not start."""
    start = asyncio.ensure_future(llm.start())
    stopped = asyncio.ensure_future(stop.requested.wait())
    await asyncio.wait([start, stopped], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not start.done():
        start.cancel()
        return False
    try:
        start.result()
    except Exception as e:
        print(f"pagedserve: error: the engine failed to start: {e}", file=sys.stderr, flush=True)
        stop.engine_dead = True
        return False
    return True


async def _serve_http(llm, server: ServerConfig, stop: _Stop) -> int:
    app = build_app(llm, server)
    # lingering_time=0: after refusing a body (413), close instead of reading what the client still sends
    runner = _AppRunner(app, handler_cancellation=True, shutdown_timeout=server.shutdown_timeout,
                        lingering_time=0, access_log=logger if logger.isEnabledFor(logging.INFO) else None)
    await runner.setup()
    site = web.TCPSite(runner, server.host, server.port)
    try:
        try:
            await site.start()
        except OSError as e:
            print(f"pagedserve: error: cannot listen on {server.host}:{server.port}: {e}", file=sys.stderr)
            return 1
        freeze_start_up_objects()  # a full collection would otherwise stall streams (see ipc/process.py)
        host = f"[{server.host}]" if ":" in server.host else server.host
        port = runner.addresses[0][1]  # the real one when --port 0
        print(f"pagedserve: serving {server.model_names()[0]} at http://{host}:{port}", flush=True)
        print(f"pagedserve: engine sockets in {llm.config.ipc_root}", flush=True)
        await _wait_for_stop(llm, stop)
        if stop.engine_dead:
            print(f"pagedserve: error: the engine died: {llm.client.dead or 'a child process exited'}",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(_DEATH_FLUSH_S)
    finally:
        cleanup = asyncio.ensure_future(runner.cleanup())
        forced = asyncio.ensure_future(stop.forced.wait())
        await asyncio.wait([cleanup, forced], return_when=asyncio.FIRST_COMPLETED)
        forced.cancel()
        if not cleanup.done():
            cleanup.cancel()
    return 1 if stop.engine_dead or not llm.is_healthy else 0


async def _wait_for_stop(llm, stop: _Stop) -> None:
    while not stop.requested.is_set():
        if not llm.is_healthy:
            stop.engine_dead = True
            return
        try:
            await asyncio.wait_for(stop.requested.wait(), _HEALTH_POLL_S)
        except asyncio.TimeoutError:
            pass


# ---------------------------------------------------------------- the app


def build_app(llm, server: ServerConfig) -> web.Application:
    names = server.model_names()
    serving = OpenAIServing(llm, names, server.chat_template, server.max_queued_requests,
                            ServerMetrics(names[0]))
    routes = _Routes(llm, serving)
    app = web.Application(client_max_size=MAX_BODY_BYTES,
                          middlewares=[_error_middleware, _auth_middleware(server.api_key)])
    app.add_routes([
        web.get("/health", routes.health), web.get("/version", routes.version),
        web.get("/metrics", routes.metrics), web.get("/v1/models", routes.models),
        web.get("/v1/models/{model:.+}", routes.model),
        web.post("/tokenize", routes.tokenize), web.post("/detokenize", routes.detokenize),
        web.post("/v1/completions", routes.completions),
        web.post("/v1/chat/completions", routes.chat_completions),
    ])
    return app


@web.middleware
async def _error_middleware(request: web.Request, handler) -> web.StreamResponse:
    """Every failure leaves as OpenAI's error body; only our own bugs are 500s (and logged)."""
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e)
    except web.HTTPException as e:  # unknown route, wrong method, body over client_max_size
        if e.status < 400:
            raise
        return error_response(ApiError(e.status, e.text or e.reason))
    except Exception as e:
        logger.exception("error handling %s %s", request.method, request.path)
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}: {e}"))


def _auth_middleware(api_key: str | None):
    expected = f"Bearer {api_key}".encode() if api_key else None

    @web.middleware
    async def auth(request: web.Request, handler) -> web.StreamResponse:
        if expected is not None and request.path.startswith("/v1"):
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):  # constant time
                raise ApiError(401, "missing or incorrect API key (Authorization: Bearer <key>)",
                               code="invalid_api_key")
        return await handler(request)

    return auth


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object, or ApiError (400 / 413)."""
    if request.content_type != "application/json":
        raise bad_request(f"Content-Type must be application/json, got {request.content_type!r}")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise ApiError(413, f"request body of {request.content_length} bytes is over the limit "
                            f"of {MAX_BODY_BYTES} bytes")
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object")
    return body


class _Routes:
    def __init__(self, llm, serving: OpenAIServing) -> None:
        self.llm = llm
        self.serving = serving
        self.completion = OpenAIServingCompletion(serving)
        self.chat = OpenAIServingChat(serving)

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if await self.llm.check_health() else 503)

    async def version(self, request: web.Request) -> web.Response:
        try:
            version = metadata.version("pagedserve")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return json_response({"version": version})

    async def metrics(self, request: web.Request) -> web.Response:
        body = self.serving.metrics.render(self.llm.client.stats)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    def _model_card(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": now(), "owned_by": "pagedserve",
                "root": self.llm.model_path, "parent": None, "max_model_len": self.llm.max_model_len}

    async def models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._model_card(name) for name in self.serving.model_names]})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model}: the official clients' models.retrieve."""
        name = request.match_info["model"]
        self.serving.check_model(name)
        return json_response(self._model_card(name))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self.completion.create(request, await read_json(request))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self.chat.create(request, await read_json(request))

    async def tokenize(self, request: web.Request) -> web.Response:
        """{"prompt": str} or {"messages": [...]} -> {"count", "max_model_len", "tokens"}; messages render
        as /v1/chat/completions renders them (add_generation_prompt, continue_final_message,
        chat_template_kwargs)."""
        body = await read_json(request)
        s = self.serving
        s.check_model(body.get("model"))
        if "messages" in body:
            chat = parse_chat(body)
            text = s.render_chat(chat.messages, chat.add_generation_prompt, chat.extra, chat.continue_final_message)
            tokens = s.tokenizer.encode(text, add_special_tokens=False)
        elif isinstance(body.get("prompt"), str):
            add_special = body.get("add_special_tokens", True) is True
            tokens = s.tokenizer.encode(body["prompt"], add_special_tokens=add_special)
        else:
            raise bad_request("give 'prompt' (a string) or 'messages'", "prompt")
        result = {"count": len(tokens), "max_model_len": s.max_model_len, "tokens": tokens}
        if body.get("return_token_strs") is True:
            result["token_strs"] = s.tokenizer.convert_ids_to_tokens(tokens)
        return json_response(result)

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        s = self.serving
        s.check_model(body.get("model"))
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("'tokens' must be an array of token ids", "tokens")
        check_token_ids(tokens, s.vocab_size, "tokens")
        return json_response({"prompt": s.tokenizer.decode(tokens)})


# ---------------------------------------------------------------- 431 for oversized headers


class _RequestHandler(web.RequestHandler):
    """aiohttp answers a header line over its limit (or too many headers) with a plain-text 400; we
    answer 431 with an OpenAI error body. The parser stops at the limit, nothing more is buffered."""

    def handle_error(self, request, status=500, exc=None, message=None):
        too_large = isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower())
        if not too_large:
            return super().handle_error(request, status, exc, message)
        return error_response(ApiError(431, f"request header fields too large: {exc}"))


class _Server(web.Server):
    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _AppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # same state, our connection handler
        return server


if __name__ == "__main__":
    sys.exit(main())
