"""Commands over a whole run: a recipe (`run`), the built-in `quickstart`, its `report`, and the
`config` reference of a stage kind.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.options import ForceOpt, SetOpt, print_stage_result
from lmforge.common.logging import console


def run_cmd(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file, or a built-in recipe name.")],
    out: Annotated[Path | None, typer.Option(help="Run directory (default runs/<name>).")] = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
    only: Annotated[str | None, typer.Option("--only", help="Run just this stage.")] = None,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="Rerun this stage and every stage after it."),
    ] = None,
) -> None:
    """Run a recipe's stages in order; unchanged stages are skipped.

    Example: lmforge run recipes/quickstart.yaml --set train.max_steps=50
    """
    from lmforge.runner import run_recipe

    run_recipe(
        recipe,
        out=out,
        overrides=sets or [],
        force=force,
        only=only,
        from_stage=from_stage,
        on_result=print_stage_result,
    )


def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>).")],
) -> None:
    """Write report.html and report.md for a run, from its manifests.

    Example: lmforge report runs/quickstart
    """
    from lmforge.evals.report import write_report

    html_path = write_report(run_dir)
    console().print(f"[green]✓[/green] report: {html_path}")


def quickstart_cmd(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/quickstart"),
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """The whole path on the built-in corpus, no download, on a CPU: data, tokenizer,
    pretraining, SFT, LoRA, a classifier, evaluation and the report.

    Runs the built-in recipe lmforge/recipes/quickstart.yaml; a second run reuses every stage.
    Example: lmforge quickstart --out runs/quickstart --set pretrain.train.max_steps=600
    """
    from lmforge.evals.report import write_report
    from lmforge.runner import run_recipe

    run_recipe(
        "quickstart", out=out, overrides=sets or [], force=force, on_result=print_stage_result
    )
    html_path = write_report(out)
    console().print(f"\n[green]✓[/green] report: [bold]{html_path}[/bold]\n\nNext:", soft_wrap=True)
    for line in (
        f"lmforge data stats {out}/data                       # the data funnel",
        "lmforge config pretrain                             # every pretraining knob",
        f"lmforge eval --model {out}/sft --tasks {out}/tasks/explain_test.jsonl --out {out}/my_eval",
        f"lmforge run quickstart --out {out} --set pretrain.train.max_steps=800   # reruns only what changes",
    ):
        console().print(f"  {line}", soft_wrap=True, highlight=False)


def config_cmd(
    kind: Annotated[str, typer.Argument(help="A stage kind, e.g. pretrain.")],
) -> None:
    """Show every config key of a stage kind with its default and meaning.

    Example: lmforge config pretrain
    """
    from rich.table import Table

    from lmforge.config import describe_fields
    from lmforge.stages import get_stage

    table = Table(title=f"{kind} config (use with --set key=value)")
    table.add_column("key", no_wrap=True)
    table.add_column("default")
    table.add_column("meaning")
    for key, default, doc in describe_fields(get_stage(kind).config_cls):
        table.add_row(key, default, doc)
    console().print(table)
