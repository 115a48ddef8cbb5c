"""The OpenAI-compatible HTTP server: thin FastAPI routes over the engines and the stores.

`create_app(settings)` builds one app; its lifespan opens the stores and starts the engines
(state.py) and, at shutdown, drains them, so SIGTERM lets in-flight requests finish.
`serve(settings)` runs it under uvicorn, in one process or N workers (runner.py). Request
handling lives in completions.py, the API key and request metrics in guard.py, the response
classes in streaming.py; this file parses, routes and maps errors to OpenAI's error body.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from exc

from lmforge.errors import InputError
from lmforge.serve.completions import CompletionService
from lmforge.serve.guard import Guard, error_response
from lmforge.serve.metrics import GAUGE_PERIOD_S, MULTIPROC_ENV, ServerMetrics
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    parse_request,
)
from lmforge.serve.retrieval import KnowledgeBase
from lmforge.serve.runner import event_loop_and_http, serve, uvicorn_options
from lmforge.serve.settings import ServeSettings, settings_from_env
from lmforge.serve.state import ServeState, open_stores, start_engines, stop_engines
from lmforge.serve.streaming import ClosingStreamingResponse, unless_disconnected

# The server's entry points in one import (the parts live in the modules named above).
__all__ = [
    "ClosingStreamingResponse", "ServeState", "create_app", "event_loop_and_http", "serve",
    "start_engines", "stop_engines", "uvicorn_options",
]  # fmt: skip

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"


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
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(APIError(500, f"internal error: {exc}", type="server_error"))

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
            return JSONResponse(await unless_disconnected(request, service.complete(prep)))
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
