"""The ASGI middleware in front of every route: the API key, and request counts and latency."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from lmforge.serve.protocol import APIError

OPEN_PATHS = {"/health", "/ready", "/ping", "/metrics", "/"}  # no API key needed
KNOWN_PATHS = OPEN_PATHS | {
    "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/models", "/v1/feedback",
    "/invocations",
}  # fmt: skip


def error_response(exc: APIError) -> JSONResponse:
    """OpenAI's error body for exc, with its status."""
    return JSONResponse(exc.body(), status_code=exc.status)


class Guard:
    """ASGI middleware: the API key on every route but the open ones; request counts by endpoint
    and status, and end-to-end latency to the last byte (streams included)."""

    def __init__(self, app: Any, state: Any, api_key: str | None) -> None:
        self.app, self.state, self.api_key = app, state, api_key  # state: state.ServeState

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
                await error_response(APIError(
                    401, "invalid or missing API key (send Authorization: Bearer KEY)",
                    type="authentication_error", code="invalid_api_key",
                ))(scope, receive, send_status)  # fmt: skip
            else:
                await self.app(scope, receive, send_status)
        finally:
            m = self.state.metrics
            m.e2e.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, str(status[0])).inc()


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
