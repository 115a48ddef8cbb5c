"""Progress bars for long work: rate in the stage's own unit, ETA, extra live fields.

A thin wrapper over rich.progress so every stage shows the same thing and honours --quiet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from lmforge.common.logging import console, is_quiet


class _RateColumn(ProgressColumn):
    """Items per second in the task's unit (docs/s, tok/s, step/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        if speed is None:
            return Text(f"? {unit}/s", style="progress.data.speed")
        if speed >= 1e6:
            return Text(f"{speed / 1e6:.2f}M {unit}/s", style="progress.data.speed")
        if speed >= 1e3:
            return Text(f"{speed / 1e3:.1f}k {unit}/s", style="progress.data.speed")
        return Text(f"{speed:.1f} {unit}/s", style="progress.data.speed")


class ProgressBar:
    """Handle for one bar: advance(n), and update(**fields) for live values like loss."""

    def __init__(self, progress: Progress | None, task_id: int | None) -> None:
        self._progress, self._task = progress, task_id

    def advance(self, n: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, **fields: Any) -> None:
        """Shows fields (e.g. loss=2.31) after the bar."""
        if self._progress is not None:
            info = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
            self._progress.update(self._task, info=info)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@contextlib.contextmanager
def progress(
    description: str, total: float | None = None, unit: str = "it"
) -> Iterator[ProgressBar]:
    """A progress bar as a context manager; a no-op handle when quiet or not rank zero."""
    if is_quiet():
        yield ProgressBar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*columns, console=console(), transient=False) as bar:
        task_id = bar.add_task(description, total=total, unit=unit, info="")
        yield ProgressBar(bar, task_id)
