"""The OpenAI-compatible HTTP server: thin FastAPI routes over the engines and the stores.

`create_app(settings)` builds one app (uvicorn's `factory=True` calls it in every worker process,
reading the settings from LMFORGE_SERVE_CONFIG); its lifespan starts the engines and, at shutdown,
drains them, so SIGTERM lets in-flight requests finish. `serve(settings)` runs it under uvicorn.
Request handling lives in completions.py; this file parses, authorizes and maps errors to
OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib.util
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from exc

from lmforge.errors import ConfigError, InputError
from lmforge.serve.cache import ResponseCache, model_identity
from lmforge.serve.completions import SSE_DONE, CompletionService
from lmforge.serve.feedback import FeedbackStore
from lmforge.serve.metrics import GAUGE_PERIOD_S, MULTIPROC_ENV, ServerMetrics, multiprocess_dir
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    parse_request,
)
from lmforge.serve.retrieval import KnowledgeBase
from lmforge.serve.safety import SafetyPolicy
from lmforge.serve.seq2seq_engine import engine_class
from lmforge.serve.settings import ENV_CONFIG, ServeSettings, settings_from_env

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
OPEN_PATHS = {"/health", "/ready", "/ping", "/metrics", "/"}  # no API key needed
KNOWN_PATHS = OPEN_PATHS | {
    "/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/feedback", "/invocations"
}  # fmt: skip


@dataclass
class ServeState:
    """What the routes share: the engines by model name and the optional stores."""

    settings: ServeSettings
    metrics: ServerMetrics
    engines: dict[str, Any] = field(default_factory=dict)
    model_ids: dict[str, str] = field(default_factory=dict)  # name -> name@content hash
    created: dict[str, int] = field(default_factory=dict)
    cache: Any = None
    safety: Any = None
    kb: Any = None
    feedback: Any = None
    ready: bool = False


def open_stores(state: ServeState) -> None:
    """The response cache, safety policy, knowledge base and feedback store the settings ask for."""
    s = state.settings
    if s.cache_entries:
        state.cache = ResponseCache(max_entries=s.cache_entries)
    if s.safety is not None:
        state.safety = SafetyPolicy.from_file(s.safety)
    if s.kb is not None and state.kb is None:  # not passed in by serve(): build it, or with
        # several workers open the index serve() built before starting them
        state.kb = KnowledgeBase.open(s.kb_path()) if s.workers > 1 else open_knowledge_base(s)
    state.feedback = FeedbackStore(s.feedback_path())


def open_knowledge_base(settings: ServeSettings) -> Any:
    """Builds (incrementally: unchanged files are skipped) or opens the --kb index."""
    return KnowledgeBase.build(settings.kb, settings.kb_path())


def start_engines(state: ServeState) -> None:
    s = state.settings
    for spec in s.models:
        engine = engine_class(spec.path).from_dir(
            spec.path, name=spec.name, device=s.device,
            max_batch_size=s.max_batch_size, max_queue=s.max_queue, threads=s.torch_threads(),
            compile=s.compile,
        )  # fmt: skip
        engine.start()
        state.engines[spec.name] = engine
        state.model_ids[spec.name] = model_identity(spec.name, spec.path)
        state.created[spec.name] = int(time.time())
        log.info("serving %s from %s (context %d)", spec.name, spec.path, engine.max_context)


def stop_engines(state: ServeState) -> None:
    """Drain: finish what is running (up to the graceful timeout), then stop."""
    timeout = state.settings.graceful_timeout_s
    for engine in state.engines.values():
        engine.shutdown(drain=True, timeout=timeout)


def create_app(settings: ServeSettings | None = None, kb: KnowledgeBase | None = None) -> FastAPI:
    """The app for one worker process; settings from LMFORGE_SERVE_CONFIG when not given. `kb`:
    the --kb index when the caller has built it already (the app closes it at shutdown)."""
    settings = settings or settings_from_env()
    shared = os.environ.get(MULTIPROC_ENV) if settings.workers > 1 else None  # serve() sets it
    state = ServeState(settings=settings, metrics=ServerMetrics(shared), kb=kb)
    service = CompletionService(state)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(open_stores, state)
        await asyncio.to_thread(start_engines, state)
        gauges, m = None, state.metrics
        if m.multiprocess_dir is not None:  # scrapes reach other workers too
            gauges = asyncio.create_task(m.observe_engines_every(state.engines, GAUGE_PERIOD_S))
        loop = type(asyncio.get_running_loop())
        log.info("event loop %s.%s", loop.__module__, loop.__qualname__)  # the one running
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            if gauges is not None:
                gauges.cancel()
            await asyncio.to_thread(stop_engines, state)
            for store in (state.feedback, state.kb):
                if store is not None:
                    store.close()
            m.close()

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(Guard, state=state, api_key=settings.resolved_api_key())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error(APIError(500, f"internal error: {exc}", type="server_error"))

    async def completions_route(request: Request, body: Any) -> Response:
        req = parse_request(CompletionRequest, body)
        return await _run(request, await service.prepare_completion(req))

    async def chat_route(request: Request, body: Any) -> Response:
        req = parse_request(ChatRequest, body)
        return await _run(request, await service.prepare_chat(req))

    async def _run(request: Request, prep: Any) -> Response:
        if not state.ready:
            raise APIError(503, "the server is not ready", type="server_error", code="not_ready")
        if prep.stream:
            return ClosingStreamingResponse(
                service.stream(prep),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        try:
            return JSONResponse(await _unless_disconnected(request, service.complete(prep)))
        except TimeoutError:
            raise APIError(
                504, f"the request took longer than {settings.request_timeout_s}s",
                type="timeout", code="timeout",
            ) from None  # fmt: skip

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completions_route(request, await _json(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat_route(request, await _json(request))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """SageMaker's inference route: a chat request when it has messages, else a completion."""
        body = await _json(request)
        if isinstance(body, dict) and "messages" in body:
            return await chat_route(request, body)
        return await completions_route(request, body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": state.created.get(name, 0),
             "owned_by": "lmforge", "max_model_len": engine.max_context}
            for name, engine in state.engines.items()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        req = parse_request(FeedbackRequest, await _json(request))
        store = state.feedback
        try:
            if req.response_id is not None and req.rating is not None:
                fid = await asyncio.to_thread(
                    store.add_rating, req.response_id, req.rating, req.comment
                )
                kind = "rating"
            elif req.chosen_id is not None and req.rejected_id is not None:
                fid = await asyncio.to_thread(
                    store.add_choice, req.chosen_id, req.rejected_id, req.prompt
                )
                kind = "choice"
            else:
                raise APIError(
                    400, "send {response_id, rating} or {chosen_id, rejected_id}",
                    param="response_id",
                )  # fmt: skip
        except InputError as exc:
            unknown = str(exc).startswith("unknown response id")  # the store's wording
            rating = req.response_id is not None
            param = "rating" if rating and not unknown else "response_id" if rating else "chosen_id"
            raise APIError(404 if unknown else 400, str(exc), param=param) from None
        state.metrics.feedback.labels(kind).inc()
        return {"ok": True, "feedback_id": fid}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if not state.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "models": sorted(state.engines)})

    @app.get("/ping")
    async def ping() -> Response:
        return await ready()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(state.engines)
        return Response(body, media_type=state.metrics.content_type)

    if WEB_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")

    return app


async def _json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


async def _unless_disconnected(request: Request, work: Any) -> Any:
    """Awaits work, cancelling it (so its engine requests are aborted) if the client goes away
    first: a non-streamed answer nobody will read should not keep its batch slot."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise APIError(499, "the client closed the request", code="client_closed")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class ClosingStreamingResponse(StreamingResponse):
    """Closes its generator however the response ends, so a client that goes away mid-stream
    aborts its engine requests now, not whenever the generator is garbage-collected. The
    stream's last write (ending with [DONE]) ends the response: the HTTP end of body leaves
    with it (the same socket send under httptools) rather than in an empty message after it."""

    async def stream_response(self, send: Any) -> None:
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        async for write in self.body_iterator:
            last = write.endswith(SSE_DONE)
            body = write.encode(self.charset)
            await send({"type": "http.response.body", "body": body, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


class Guard:
    """ASGI middleware: the API key on every route but the open ones; request counts by endpoint
    and status, and end-to-end latency to the last byte (streams included)."""

    def __init__(self, app: Any, state: ServeState, api_key: str | None) -> None:
        self.app, self.state, self.api_key = app, state, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]
        path = scope["path"]
        endpoint = path if path in KNOWN_PATHS else "other"

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (
                self.api_key is not None
                and path not in OPEN_PATHS
                and not _authorized(Request(scope), self.api_key)
            ):
                await _error(APIError(
                    401, "invalid or missing API key (send Authorization: Bearer KEY)",
                    type="authentication_error", code="invalid_api_key",
                ))(scope, receive, send_status)  # fmt: skip
            else:
                await self.app(scope, receive, send_status)
        finally:
            m = self.state.metrics
            m.e2e.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status[0])).inc()


def event_loop_and_http(settings: ServeSettings) -> tuple[str, str]:
    """The event loop and HTTP parser uvicorn runs: the settings' choices, "auto" made explicit
    the way uvicorn resolves it (uvloop / httptools when installed, else asyncio / h11); asking
    for one that is not installed is a ConfigError naming the flag."""

    def pick(flag: str, choice: str, fast: str, fallback: str) -> str:
        installed = importlib.util.find_spec(fast) is not None
        if choice == "auto":
            return fast if installed else fallback
        if choice == fast and not installed:
            raise ConfigError(
                f"--{flag} {choice}: {choice} is not installed; pip install 'lmforge[serve]' "
                f"(or {choice}), or pass --{flag} {fallback}"
            )
        return choice

    loop = pick("loop", settings.loop, "uvloop", "asyncio")
    return loop, pick("http", settings.http, "httptools", "h11")


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """uvicorn.run / uvicorn.Config keywords for these settings (all but the app and workers)."""
    loop, http = event_loop_and_http(settings)
    return dict(
        host=settings.host, port=settings.port, loop=loop, http=http,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s), log_level="info",
    )  # fmt: skip


def serve(settings: ServeSettings) -> None:
    """Runs the server until SIGINT/SIGTERM; in-flight requests get graceful_timeout_s to end."""
    import uvicorn

    common = uvicorn_options(settings)  # a missing --loop/--http choice fails before the kb build
    log.info("uvicorn with event loop %s, HTTP parser %s", common["loop"], common["http"])
    # built once here (so a bad --kb fails before the server starts), not by every worker at once
    kb = open_knowledge_base(settings) if settings.kb is not None else None
    if settings.workers == 1:
        uvicorn.run(create_app(settings, kb=kb), **common)
        return
    if kb is not None:
        kb.close()
    with multiprocess_dir():  # exported before the workers import prometheus_client
        os.environ[ENV_CONFIG] = settings.model_dump_json()
        uvicorn.run(
            "lmforge.serve.server:create_app", factory=True, workers=settings.workers, **common
        )
