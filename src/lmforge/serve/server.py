"""The OpenAI-compatible HTTP server: thin FastAPI routes over the engines and the stores.

`create_app(settings)` builds one app; its lifespan opens the stores and starts the engines
(state.py) and, at shutdown, drains them, so SIGTERM lets in-flight requests finish.
`serve(settings)` runs it under uvicorn, in one process or N workers (runner.py). The routes
live in routes.py (one function per seam: errors, completions, feedback, status), request
handling in completions.py, the API key and request metrics in guard.py, the response classes
in streaming.py; this file assembles the app and its lifespan.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

try:
    from fastapi import FastAPI
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'lmforge[serve]'") from exc

from lmforge.serve.guard import Guard
from lmforge.serve.lora_routes import add_lora_routes
from lmforge.serve.metrics import GAUGE_PERIOD_S, MULTIPROC_ENV, ServerMetrics
from lmforge.serve.retrieval import KnowledgeBase
from lmforge.serve.routes import (
    add_completion_routes,
    add_embedding_route,
    add_error_handlers,
    add_feedback_route,
    add_status_routes,
)
from lmforge.serve.runner import event_loop_and_http, serve, uvicorn_options
from lmforge.serve.settings import ServeSettings, settings_from_env
from lmforge.serve.state import ServeState, open_stores, start_engines, stop_engines
from lmforge.serve.streaming import ClosingStreamingResponse

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
    app = FastAPI(title="lmforge", lifespan=lifespan(state), docs_url=None, redoc_url=None)
    app.state.serve = state
    app.add_middleware(Guard, state=state, api_key=settings.resolved_api_key())
    add_error_handlers(app)
    add_completion_routes(app, state)
    add_embedding_route(app, state)
    add_feedback_route(app, state)
    add_status_routes(app, state)
    if settings.runtime_lora_updating:
        add_lora_routes(app, state)
    if WEB_DIR.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


def lifespan(state: ServeState):
    """The app's lifespan: stores opened and engines started before the first request; at
    shutdown the engines drained (in-flight requests finish) and the stores closed."""

    @asynccontextmanager
    async def run(app: FastAPI):
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

    return run
