"""Runs the app under uvicorn: the event loop and HTTP parser, uvicorn's options, one process or
N workers (each a fresh interpreter that repeats the CLI's logging set-up before building its app).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any

from lmforge.common.logging import logging_env, setup_logging_from_env
from lmforge.errors import ConfigError
from lmforge.serve.metrics import multiprocess_dir
from lmforge.serve.settings import ENV_CONFIG, ServeSettings
from lmforge.serve.state import open_knowledge_base

log = logging.getLogger(__name__)


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


def create_worker_app() -> Any:
    """uvicorn's factory in each of N worker processes: lmforge's logging as the CLI set it up
    in the parent (else "serving ..." and warnings would go unformatted or nowhere), then the
    app for the settings the parent exported."""
    from lmforge.serve.server import create_app

    setup_logging_from_env()
    return create_app()


def serve(settings: ServeSettings) -> None:
    """Runs the server until SIGINT/SIGTERM; in-flight requests get graceful_timeout_s to end."""
    import uvicorn

    from lmforge.serve.server import create_app

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
        os.environ.update(logging_env())
        uvicorn.run(
            f"{__name__}:create_worker_app", factory=True, workers=settings.workers, **common
        )
