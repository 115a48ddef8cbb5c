"""`lmforge data`: prepare a corpus, print its funnel, export serving feedback as training data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.options import ConfigOpt, ForceOpt, SetOpt, run_stage_command
from lmforge.common.logging import console

data_app = typer.Typer(help="Prepare a clean, deduplicated, split corpus.", no_args_is_help=True)


@data_app.command("prepare")
def data_prepare_cmd(
    source: Annotated[
        list[str] | None,
        typer.Option(
            "--source", help="File, folder, glob, HF dataset dir or 'stdlib-docs' (repeatable)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: splits, stats.json, samples/.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: all cores).")
    ] = None,
    executor: Annotated[str | None, typer.Option(help="local | ray")] = None,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (--executor ray).")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Read sources, clean, filter, anonymize, deduplicate, decontaminate and split them.

    Example: lmforge data prepare --source stdlib-docs --out runs/x/data --set quality.preset=lenient
    """
    values = {
        "source": source,
        "out": out,
        "workers": workers,
        "executor": executor,
        "address": address,
    }
    run_stage_command("data", values, config, sets, force)


@data_app.command("stats")
def data_stats_cmd(
    out_dir: Annotated[Path, typer.Argument(help="A data stage directory.")],
    bias: Annotated[
        bool, typer.Option("--bias", help="Also count demographic terms per split and group.")
    ] = False,
    terms: Annotated[
        Path | None, typer.Option(help="--bias: term groups file (default: the built-in list).")
    ] = None,
    group: Annotated[
        list[str] | None, typer.Option("--group", help="--bias: only this group (repeatable).")
    ] = None,
) -> None:
    """Print the funnel: documents and characters through each step, drop reasons, splits.

    Example: lmforge data stats runs/x/data --bias --group gender
    """
    from lmforge.data.stats import bias_table, funnel_table, load_stats

    console().print(funnel_table(load_stats(out_dir)))
    if bias:
        from lmforge.data.bias_stats import stage_term_report

        console().print(bias_table(stage_term_report(out_dir, terms, group)))


@data_app.command("feedback-export")
def data_feedback_export_cmd(
    db: Annotated[
        Path | None, typer.Option(help="The feedback store (SQLite) `lmforge serve` wrote.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory: sft.jsonl, preferences.jsonl, kto.jsonl, manifest.json."),
    ] = None,
    min_rating: Annotated[
        float | None,
        typer.Option(help="SFT keeps responses rated at least this (1..5; thumbs up = 5)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Turn served responses and their ratings and side-by-side choices into training data.

    Writes sft.jsonl (well-rated responses, for `lmforge finetune --data`), preferences.jsonl
    (choices, and differently-rated answers to one prompt, for `lmforge align --data`) and
    kto.jsonl (each rated answer labelled desirable or undesirable by --set desirable_min_rating /
    undesirable_max_rating, choices unpaired, for `lmforge align --method kto`).

    Example: lmforge data feedback-export --db runs/serve/feedback.db --out runs/fb/export --min-rating 4
    """
    values = {"db": db, "out": out, "min_rating": min_rating}
    run_stage_command("feedback-export", values, config, sets, force)
