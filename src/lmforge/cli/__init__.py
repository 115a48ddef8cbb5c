"""The `lmforge` command: one entry point, one thin subcommand per stage.

Each stage command gathers its flags into a dict and hands them to runner.run_single(), which
merges them over `--config FILE.yaml` and under `--set key=value`, validates, and runs the stage
with caching. No stage logic lives here. Errors a person can fix print as one line (exit 2);
failures while working exit 1.

This module builds the app from the command groups (one module each) in the order `--help`
lists them; `main` is the console entry point and `python -m lmforge.cli`.
"""

from __future__ import annotations

import sys
from typing import Annotated

import click
import typer
from rich.markup import escape

from lmforge.cli import compress, data, evaluate, runs, serve, tokenizer, training
from lmforge.common.logging import console, setup_logging
from lmforge.errors import LmforgeError

app = typer.Typer(
    name="lmforge",
    help="Take a language model through its whole life: data, tokenizer, pretraining, "
    "fine-tuning, evaluation and the report.\n\nExample: lmforge quickstart",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def _global_options(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log as JSON lines on stderr.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(quiet=quiet, log_json=log_json, verbose=verbose)


# Typer lists single commands first, then groups, each in the order they are added here.
for _name, _command in (
    ("run", runs.run_cmd),
    ("report", runs.report_cmd),
    ("pretrain", training.pretrain_cmd),
    ("eval", evaluate.eval_cmd),
    ("finetune", training.finetune_cmd),
    ("align", training.align_cmd),
    ("tune", training.tune_cmd),
    ("generate", evaluate.generate_cmd),
    ("quickstart", runs.quickstart_cmd),
    ("config", runs.config_cmd),
):
    app.command(_name)(_command)
for _name, _group in (
    ("tokenizer", tokenizer.tokenizer_app),
    ("data", data.data_app),
    ("compress", compress.compress_app),
    ("serve", serve.serve_app),
):
    app.add_typer(_group, name=_name)


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """click's exception class `name` and, where typer bundles its own copy of click (typer >=
    0.2x raises typer._click's classes, which click's handlers never catch), that copy's too."""
    found = [getattr(click.exceptions, name)]
    try:
        from typer._click import exceptions as bundled
    except ImportError:  # typer running on the installed click
        bundled = None
    if bundled is not None and hasattr(bundled, name):
        found.append(getattr(bundled, name))
    if hasattr(typer, name):  # typer.Exit / typer.Abort
        found.append(getattr(typer, name))
    return tuple(dict.fromkeys(found))


CLICK_ERRORS = _click_classes("ClickException")
EXITS = _click_classes("Exit")
ABORTS = _click_classes("Abort")


def main() -> None:
    """Console entry point: runs the app and turns expected errors into one line + exit code."""
    command = typer.main.get_command(app)
    try:
        command.main(args=sys.argv[1:], prog_name="lmforge", standalone_mode=False)
    except LmforgeError as exc:
        console(always=True).print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except EXITS as exc:
        sys.exit(exc.exit_code)
    except CLICK_ERRORS as exc:  # usage errors (and bare `lmforge`: help), no traceback
        exc.show()
        sys.exit(exc.exit_code)
    except ABORTS:
        sys.exit(130)
    except KeyboardInterrupt:
        console().print("[red]interrupted[/red]")
        sys.exit(130)
