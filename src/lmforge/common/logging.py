"""Human-facing output: one rich console, log setup for --quiet / --log-json, metrics.jsonl.

Nothing here runs at import time; the CLI calls setup_logging() once (a child process it starts,
such as a uvicorn worker, repeats it from logging_env()). Library code only uses
`logging.getLogger(__name__)`; only rank zero prints.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

_state = {"quiet": False, "json": False, "verbose": False, "set_up": False}
LOG_ENV = "LMFORGE_LOGGING"  # setup_logging's choices, for child processes to repeat


def is_rank_zero() -> bool:
    """True on the process that talks to people (rank 0 under torchrun, or no torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def console(always: bool = False) -> Console:
    """The one console for human output (stderr, so stdout stays clean for data).

    Args:
        always: print even under --quiet (errors must never be swallowed).
    """
    return Console(stderr=True, quiet=not always and (_state["quiet"] or not is_rank_zero()))


def is_quiet() -> bool:
    """Whether progress bars and chatter are switched off (--quiet or JSON logs)."""
    return _state["quiet"] or _state["json"] or not is_rank_zero()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": round(record.created, 3),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def setup_logging(quiet: bool = False, log_json: bool = False, verbose: bool = False) -> None:
    """Routes lmforge's loggers to rich (or JSON lines) on stderr."""
    _state.update(quiet=quiet, json=log_json, verbose=verbose, set_up=True)
    root = logging.getLogger("lmforge")
    root.handlers.clear()
    if log_json:
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
    else:
        handler = RichHandler(console=console(), show_path=False, show_time=False, markup=False)
    root.addHandler(handler)
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    root.setLevel(level if is_rank_zero() else logging.WARNING)
    root.propagate = False


def logging_env() -> dict[str, str]:
    """An environment entry holding this process's setup_logging choices (none when it never
    ran), for a child process that imports lmforge afresh to repeat them."""
    if not _state["set_up"]:
        return {}
    choices = {"quiet": _state["quiet"], "log_json": _state["json"], "verbose": _state["verbose"]}
    return {LOG_ENV: json.dumps(choices)}


def setup_logging_from_env() -> None:
    """In a child process: setup_logging as its parent ran it (see logging_env); nothing when
    the parent never set up logging (lmforge used as a library)."""
    choices = os.environ.get(LOG_ENV)
    if choices is not None:
        setup_logging(**json.loads(choices))


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl (rank zero only; flushed per record)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh = None

    def log(self, **values: Any) -> None:
        """Writes a record; adds a wall-clock timestamp."""
        if not is_rank_zero():
            return
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="utf-8")
        record = {"time": round(time.time(), 3), **values}
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Reads metrics.jsonl, ignoring a torn last line from a killed process."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
