"""The server's routes, one function per seam, each adding its routes to the app.

error handlers (every error as OpenAI's error body), the completion routes (/v1/completions,
/v1/chat/completions, SageMaker's /invocations), embeddings (/v1/embeddings), feedback
(/v1/feedback) and the status routes (/v1/models, /health, /ready, /ping, /metrics). Each route
parses and hands over: requests run in completions.py, embeddings in embeddings_api.py, ratings
go to the feedback store, the numbers come from ServeState.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import InputError
from lmforge.serve.completions import CompletionService
from lmforge.serve.embeddings_api import EmbeddingRequest, create_embeddings
from lmforge.serve.guard import error_response
from lmforge.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    FeedbackRequest,
    parse_request,
)
from lmforge.serve.state import ServeState
from lmforge.serve.streaming import ClosingStreamingResponse, unless_disconnected

log = logging.getLogger(__name__)


def add_error_handlers(app: FastAPI) -> None:
    """APIError as its own body; FastAPI's HTTP errors and unhandled ones as OpenAI's too."""

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


def add_completion_routes(app: FastAPI, state: ServeState) -> None:
    """/v1/completions, /v1/chat/completions and /invocations, run by one CompletionService."""
    service = CompletionService(state)

    async def run(request: Request, prep: Any) -> Response:
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
                504, f"the request took longer than {state.settings.request_timeout_s}s",
                type="timeout", code="timeout",
            ) from None  # fmt: skip

    async def completion(request: Request, body: Any) -> Response:
        req = parse_request(CompletionRequest, body)
        return await run(request, await service.prepare_completion(req))

    async def chat(request: Request, body: Any) -> Response:
        req = parse_request(ChatRequest, body)
        return await run(request, await service.prepare_chat(req))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await completion(request, await request_json(request))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await chat(request, await request_json(request))

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        """SageMaker's inference route: a chat request when it has messages, else a completion."""
        body = await request_json(request)
        if isinstance(body, dict) and "messages" in body:
            return await chat(request, body)
        return await completion(request, body)


def add_embedding_route(app: FastAPI, state: ServeState) -> None:
    """/v1/embeddings: OpenAI's embeddings API over the models that embed."""

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        req = parse_request(EmbeddingRequest, await request_json(request))
        if not state.ready:
            raise APIError(503, "the server is not ready", type="server_error", code="not_ready")
        return await create_embeddings(state, req)


def add_feedback_route(app: FastAPI, state: ServeState) -> None:
    """/v1/feedback: a rating of one response, or a choice between two."""

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> dict[str, Any]:
        req = parse_request(FeedbackRequest, await request_json(request))
        kind, fid = await record_feedback(state, req)
        state.metrics.feedback.labels(kind).inc()
        return {"ok": True, "feedback_id": fid}


async def record_feedback(state: ServeState, req: FeedbackRequest) -> tuple[str, Any]:
    """(kind, feedback id) of req written to the store; a bad or unknown id is a 400 / 404
    naming the field."""
    store = state.feedback
    try:
        if req.response_id is not None and req.rating is not None:
            fid = await asyncio.to_thread(
                store.add_rating, req.response_id, req.rating, req.comment
            )
            return "rating", fid
        if req.chosen_id is not None and req.rejected_id is not None:
            fid = await asyncio.to_thread(
                store.add_choice, req.chosen_id, req.rejected_id, req.prompt
            )
            return "choice", fid
        raise APIError(
            400, "send {response_id, rating} or {chosen_id, rejected_id}", param="response_id"
        )
    except InputError as exc:
        unknown = str(exc).startswith("unknown response id")  # the store's wording
        rating = req.response_id is not None
        param = "rating" if rating and not unknown else "response_id" if rating else "chosen_id"
        raise APIError(404 if unknown else 400, str(exc), param=param) from None


def add_status_routes(app: FastAPI, state: ServeState) -> None:
    """/v1/models, /health, /ready (SageMaker's /ping) and /metrics."""

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [
            {"id": name, "object": "model", "created": state.created.get(name, 0),
             "owned_by": "lmforge", "max_model_len": context, "tasks": state.tasks(name),
             **state.lineage(name)}
            for name, context in state.max_context().items()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if not state.ready:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "models": sorted(state.max_context())})

    @app.get("/ping")
    async def ping() -> Response:
        return await ready()

    @app.get("/metrics")
    async def metrics() -> Response:
        body = state.metrics.render(state.engines)
        return Response(body, media_type=state.metrics.content_type)


async def request_json(request: Request) -> Any:
    """The request body as JSON, or a 400 saying why it is not."""
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(
            400, f"the request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
