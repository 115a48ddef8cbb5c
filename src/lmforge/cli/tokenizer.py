"""`lmforge tokenizer`: train a tokenizer, encode token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.options import ConfigOpt, ForceOpt, SetOpt, run_stage_command

tokenizer_app = typer.Typer(help="Train a tokenizer and encode token shards.", no_args_is_help=True)


@tokenizer_app.command("train")
def tokenizer_train_cmd(
    data: Annotated[
        Path | None, typer.Option(help="Data stage directory (train/val splits).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Tokenizer directory to write.")] = None,
    kind: Annotated[str | None, typer.Option(help="bpe | wordpiece | unigram | char")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Target vocabulary size.")] = None,
    import_from: Annotated[
        Path | None, typer.Option(help="Import this tokenizer.json / HF tokenizer dir instead.")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a tokenizer (HF layout, loads in transformers.AutoTokenizer).

    Example: lmforge tokenizer train --data runs/x/data --out runs/x/tokenizer --kind bpe --vocab-size 8192
    """
    values = {
        "data": data,
        "out": out,
        "kind": kind,
        "vocab_size": vocab_size,
        "import_from": import_from,
    }
    run_stage_command("tokenizer", values, config, sets, force)


@tokenizer_app.command("encode")
def tokenizer_encode_cmd(
    data: Annotated[Path | None, typer.Option(help="Data stage directory.")] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="Tokenizer directory.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Shard directory: train.bin, val.bin, meta.json.")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Encode the data splits into flat token shards for pretraining.

    Example: lmforge tokenizer encode --data runs/x/data --tokenizer runs/x/tokenizer --out runs/x/tokens
    """
    run_stage_command(
        "tokens", {"data": data, "tokenizer": tokenizer, "out": out}, config, sets, force
    )
