"""lmforge.evals: perplexity, metrics, tasks, error analysis, the eval stage and the run report.

`evaluate(cfg)` is the eval stage's public API; it imports torch only when called, so the report
(`lmforge.evals.report`) stays importable without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmforge.evals.stage import EvalConfig


def evaluate(cfg: EvalConfig | dict[str, Any], force: bool = False) -> Path:
    """Runs (or reuses) the eval stage described by cfg; returns its directory."""
    from lmforge.evals.stage import evaluate as run

    return run(cfg, force=force)


__all__ = ["evaluate"]
