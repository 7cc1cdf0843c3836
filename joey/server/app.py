"""``joey serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on joey's continuous batch.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streaming as OpenAI's SSE
chunks ending with ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` (503 while the model
loads, then 200) and ``GET /metrics`` (Prometheus). Every answer carries the request's speculative
statistics in an extra ``speculative`` field. The model loads in a background thread after the
socket is bound, so health checks see the loading state; one ``BatchWorker`` thread decodes.

Errors always come in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request (never FastAPI's 422), 401 without the API key, 404 for an unknown model or route, 429
when batch and queue are full, 500 when one request fails inside the engine (the others go on).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from joey.config import Generation, SpecConfig
from joey.continuous import ContinuousBatch
from joey.errors import JoeyError
from joey.request import StreamEvent
from joey.server.metrics import CONTENT_TYPE, ServerMetrics
from joey.server.schemas import APIError, ChatRequest, CompletionRequest, _Sampling, parse
from joey.server.worker import BatchWorker, Handle, Overloaded

log = logging.getLogger("joey.server")
DISCONNECT_POLL_S = 0.25  # how often a request waiting for its first event checks that its client is still there


@dataclass(frozen=True)
class ServerSettings:
    """What one server runs: one drafting method for all requests, and its bounds."""

    method: str | None = None  # None: the model's default method
    spec: SpecConfig = SpecConfig()
    max_batch: int = 16
    max_queue: int = 64
    api_key: str | None = None
    model_name: str | None = None  # the id clients send; None: the engine's name
    default_max_tokens: int = 1024  # a chat request without max_tokens (completions: OpenAI's 16)
    replica: str | None = None  # a replica's id (Ray Serve): a label on every metric, so replicas' series stay apart


class ClientGone(Exception):
    """The client disconnected while its request was waiting."""


def error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status == 429 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


class JoeyServer:
    """The FastAPI app with its model, worker and metrics. ``load`` builds the engine (in a thread)."""

    def __init__(self, load: Callable[[], Any], settings: ServerSettings | None = None) -> None:
        self.settings = settings or ServerSettings()
        self.load = load
        self.engine: Any = None
        self.method: str | None = None
        self.worker: BatchWorker | None = None
        self.metrics: ServerMetrics | None = None
        self.load_error: str | None = None
        self.on_load_error: Callable[[], None] = lambda: None
        self.ready = threading.Event()
        self.app = self._build_app()

    # -- loading ---------------------------------------------------------------------------------
    def _load(self) -> None:
        try:
            engine = self.load()
            method = engine.resolve_method(self.settings.method)
            batch = ContinuousBatch(engine, method, self.settings.spec, max_batch=self.settings.max_batch)
            self.engine, self.method = engine, method
            self.metrics = ServerMetrics(self.model_name, self.settings.replica)
            self.worker = BatchWorker(batch, self.settings.max_queue, self.metrics)
            self.worker.start()
            self.ready.set()
            log.info("joey: serving %s with method %s (max batch %d, queue %d)", self.model_name, method,
                     self.settings.max_batch, self.settings.max_queue)
        except Exception as exc:  # reported by `joey serve` as one line, after the server stops
            self.load_error = str(exc) if isinstance(exc, JoeyError) else f"{type(exc).__name__}: {exc}"
            self.on_load_error()

    def load_now(self) -> None:
        """Load the model in this thread and start decoding; raises ``JoeyError`` with the reason when
        it fails. For a Ray Serve replica, whose constructor must not return before it can serve."""
        self._load()
        if self.load_error:
            raise JoeyError(self.load_error)

    @property
    def model_name(self) -> str:
        return self.settings.model_name or (self.engine.name if self.engine is not None else "joey")

    # -- the app ---------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            if not self.ready.is_set():  # not loaded already by load_now()
                threading.Thread(target=self._load, name="joey-load", daemon=True).start()
            yield
            if self.worker is not None:
                await asyncio.to_thread(self.worker.stop)

        app = FastAPI(title="joey", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(_Gate, server=self)

        @app.exception_handler(APIError)
        async def api_error(request: Request, exc: APIError) -> JSONResponse:
            return error_response(exc)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
            code = "not_found" if exc.status_code == 404 else None
            return error_response(APIError(exc.status_code, str(exc.detail), code=code))

        @app.exception_handler(Exception)
        async def internal_error(request: Request, exc: Exception) -> JSONResponse:
            log.exception("joey: internal error")
            return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error"))

        @app.get("/health")
        async def health() -> Response:
            if self.load_error:
                return JSONResponse({"status": "failed", "error": self.load_error}, status_code=500)
            if not self.ready.is_set():
                return JSONResponse({"status": "loading"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/metrics")
        async def metrics() -> Response:
            if self.metrics is None:
                return Response("# the model is loading\n", status_code=503, media_type="text/plain")
            return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return {"object": "list", "data": [{
                "id": self.model_name, "object": "model", "created": int(time.time()), "owned_by": "joey",
                "max_model_len": self.engine.context_length, "method": self.method,
            }]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            req = parse(ChatRequest, await request.body())
            self._check_model(req)
            roles = {"developer": "system"}  # OpenAI's newer name for the system role
            messages = [{"role": roles.get(m.role, m.role), "content": m.text()} for m in req.messages]
            ids = self._encode(lambda: self.engine.encode(messages, chat=True), "messages")
            return await self._answer(request, req, ids, chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            req = parse(CompletionRequest, await request.body())
            self._check_model(req)
            if isinstance(req.prompt, list):
                vocab = self.engine.model.cfg.vocab_size
                if any(not 0 <= t < vocab for t in req.prompt):
                    raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
                ids = list(req.prompt)
            else:
                ids = self._encode(lambda: self.engine.encode(req.prompt, chat=False), "prompt")
            return await self._answer(request, req, ids, chat=False)

        return app

    # -- requests --------------------------------------------------------------------------------
    def _check_model(self, req: _Sampling) -> None:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server has '{self.model_name}'",
                           param="model", code="model_not_found")

    @staticmethod
    def _encode(encode: Callable[[], list[int]], param: str) -> list[int]:
        try:
            return encode()
        except JoeyError as exc:
            raise APIError(400, f"{param}: {exc}", param=param)

    async def _answer(self, request: Request, req: _Sampling, ids: list[int], chat: bool) -> Response:
        context = self.engine.context_length
        if len(ids) >= context:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the model's context is {context}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        try:
            params = req.sampling(req.limit(self.settings.default_max_tokens))
        except JoeyError as exc:
            raise APIError(400, str(exc))
        try:
            handle = self.worker.submit(ids, params)
        except Overloaded:
            raise APIError(429, f"the server is at capacity ({self.settings.max_batch} running, "
                                f"{self.settings.max_queue} waiting); retry later",
                           kind="rate_limit_error", code="rate_limit_exceeded")
        finished = False
        try:
            first = await self._next(handle, request)
            if first.error is not None:
                finished = True
                raise self._internal(first.error)
            reply = _Reply(self, chat, req.include_usage, len(ids))
            if req.stream:
                finished = True  # from here on the stream's own cleanup cancels it
                return StreamingResponse(self._sse(handle, first, reply), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            events = [first]
            while not events[-1].last:
                events.append(await self._next(handle, request))
            finished = True
            if events[-1].error is not None:
                raise self._internal(events[-1].error)
            return JSONResponse(reply.whole("".join(e.text for e in events), events[-1].generation))
        except ClientGone:
            finished = True
            return Response(status_code=499)  # nobody reads it; the row was cancelled
        finally:
            if not finished:  # the handler itself was cancelled (shutdown)
                self.worker.cancel(handle.key)

    async def _next(self, handle: Handle, request: Request) -> StreamEvent:
        """The request's next event; a client that disconnects meanwhile has its row cancelled."""
        while True:
            try:
                return await asyncio.wait_for(handle.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.worker.cancel(handle.key)
                    raise ClientGone

    @staticmethod
    def _internal(exc: Exception) -> APIError:
        log.error("joey: a request failed in the engine: %s: %s", type(exc).__name__, exc)
        return APIError(500, f"the request failed in the engine: {type(exc).__name__}: {exc}", kind="server_error")

    async def _sse(self, handle: Handle, first: StreamEvent, reply: _Reply) -> AsyncIterator[str]:
        """OpenAI's streaming chunks; a client that goes away cancels the row (this generator is
        cancelled, and ``finally`` runs)."""
        done = False
        try:
            yield _data(reply.chunk(role=True))
            event = first
            while True:
                if event.error is not None:
                    yield _data(self._internal(event.error).body())
                    break
                if event.text:
                    yield _data(reply.chunk(text=event.text))
                if event.generation is not None:
                    yield _data(reply.chunk(generation=event.generation))
                    if reply.include_usage:
                        yield _data(reply.usage_chunk(event.generation))
                    break
                event = await handle.events.get()
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self.worker.cancel(handle.key)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Reply:
    """Builds one request's response objects (whole or chunks), chat or text completion."""

    def __init__(self, server: JoeyServer, chat: bool, include_usage: bool, prompt_tokens: int) -> None:
        self.chat, self.include_usage, self.prompt_tokens = chat, include_usage, prompt_tokens
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = server.model_name

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _usage(self, gen: Generation) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": gen.new_tokens,
                "total_tokens": self.prompt_tokens + gen.new_tokens}

    @staticmethod
    def speculative(gen: Generation) -> dict[str, Any]:
        s = gen.stats
        return {"method": gen.method, "seed": gen.seed, "steps": s.steps,
                "mean_accepted_tokens": round(s.mean_accepted_tokens, 4),
                "draft_tokens": s.draft_tokens, "accepted_tokens": sum(s.accepted_by_depth),
                "acceptance_by_position": [round(a, 4) for a in s.acceptance_by_position]}

    def whole(self, text: str, gen: Generation) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": gen.finish_reason}
            body = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": gen.finish_reason}
            body = self._head("text_completion")
        return {**body, "choices": [choice], "usage": self._usage(gen), "speculative": self.speculative(gen)}

    def chunk(self, text: str = "", role: bool = False, generation: Generation | None = None) -> dict[str, Any]:
        reason = generation.finish_reason if generation is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            body = {**self._head("text_completion"),
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
        if generation is not None:
            body["speculative"] = self.speculative(generation)
        return body

    def usage_chunk(self, gen: Generation) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self._usage(gen)}


class _Gate:
    """ASGI middleware in front of ``/v1``: the API key (401), then readiness (503). Pure ASGI, not
    Starlette's BaseHTTPMiddleware, so streaming and disconnect detection pass through untouched."""

    def __init__(self, app: Any, server: JoeyServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            error = self._check(dict(scope["headers"]))
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, headers: dict[bytes, bytes]) -> APIError | None:
        key = self.server.settings.api_key
        if key:
            given = headers.get(b"authorization", b"").decode("latin-1")
            token = given[7:].strip() if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), key.encode()):
                return APIError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                                code="invalid_api_key")
        if not self.server.ready.is_set():
            if self.server.load_error:
                return APIError(500, f"the model failed to load: {self.server.load_error}", kind="server_error")
            return APIError(503, "the model is still loading; retry shortly", kind="server_error",
                            code="model_loading")
        return None
