"""The options every stage command takes and the body they all run: the merge of flags,
--config and --set happens in runner.run_single; this prints the one-line result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.common.logging import console

# Options shared by every stage command.
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="YAML file with this stage's config (flags and --set win)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one config key, e.g. --set train.lr=3e-4 (repeatable)."),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Rerun even if a matching result exists.")]


def run_stage_command(
    kind: str, values: dict[str, Any], config: Path | None, sets: list[str] | None, force: bool
) -> None:
    """The body of every stage command: run it, then print its headline."""
    from lmforge.runner import run_single

    result = run_single(kind, values, config_file=config, overrides=sets or [], force=force)
    print_stage_result(kind, result)


def print_stage_result(name: str, result: Any) -> None:
    """One line per stage: cached or done, its time, its headline metrics, where it wrote."""
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in list(result.metrics.items())[:6])
    if result.cached:
        console().print(
            f"[dim]= {name}: cached[/dim]  {shown}  [dim]{result.out}[/dim]", soft_wrap=True
        )
    else:
        console().print(
            f"[green]✓[/green] [bold]{name}[/bold] {result.duration_s:.1f}s  {shown}  [dim]{result.out}[/dim]",
            soft_wrap=True,
        )


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
