"""`lmforge compress`: quantize, prune, distill, export; each one method of the compress stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.cli.options import ConfigOpt, ForceOpt, SetOpt, run_stage_command

compress_app = typer.Typer(
    help="Make a trained model smaller or portable: quantize, prune, distill, export.",
    no_args_is_help=True,
)

CompressModelOpt = Annotated[
    Path | None, typer.Option("--model", help="Model directory (HF layout + tokenizer files).")
]
CompressOutOpt = Annotated[
    Path | None, typer.Option("--out", help="Stage directory (compression.json and the model).")
]
CompressDataOpt = Annotated[
    Path | None, typer.Option("--data", help="Data directory whose val split scores quality.")
]


def _compress(method: str, model: Path | None, out: Path | None, data: Path | None,
              config: Path | None, sets: list[str] | None, force: bool,
              settings: dict[str, Any], tokens: Path | None = None) -> None:  # fmt: skip
    """Runs the compress stage; the method's flags that were given fill its config section."""
    values: dict[str, Any] = {"method": method, "model": model, "out": out, "data": data}
    if given := {k: v for k, v in settings.items() if v is not None}:
        values[method] = given
    if tokens is not None:
        values["tokens"] = tokens
    run_stage_command("compress", values, config, sets, force)


@compress_app.command("quantize")
def compress_quantize_cmd(
    model: CompressModelOpt = None,
    out: CompressOutOpt = None,
    data: CompressDataOpt = None,
    scheme: Annotated[str | None, typer.Option(help="int8 | int4 (weight-only)")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="rtn (round to nearest) | gptq | awq (calibrated: need --tokens or "
            "--data, whose train split then calibrates)"
        ),
    ] = None,
    tokens: Annotated[
        Path | None,
        typer.Option(
            help="Token shards made with the model's tokenizer: gptq/awq calibrate on "
            "their train.bin."
        ),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Quantize every weight matrix to int8/int4 (out/final/ reloads without the original).

    Example: lmforge compress quantize --model runs/x/pretrain --data runs/x/data --out runs/x/int8 --scheme int8

    Example: lmforge compress quantize --model runs/x/pretrain --data runs/x/data --tokens runs/x/tokens --out runs/x/gptq4 --scheme int4 --method gptq
    """
    settings = {"scheme": scheme, "method": method}
    _compress("quantize", model, out, data, config, sets, force, settings, tokens)


@compress_app.command("prune")
def compress_prune_cmd(
    model: CompressModelOpt = None,
    out: CompressOutOpt = None,
    data: CompressDataOpt = None,
    kind: Annotated[str | None, typer.Option(help="magnitude | neurons | heads")] = None,
    sparsity: Annotated[float | None, typer.Option(help="Fraction removed, e.g. 0.5.")] = None,
    tokens: Annotated[
        Path | None, typer.Option(help="Token shards for a recovery fine-tune (optional).")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Prune weights (magnitude) or whole MLP units / attention heads, then optionally recover.

    Example: lmforge compress prune --model runs/x/pretrain --data runs/x/data --tokens runs/x/tokens --out runs/x/pruned --kind neurons --sparsity 0.25 --set train.max_steps=50
    """
    settings = {"kind": kind, "sparsity": sparsity}
    _compress("prune", model, out, data, config, sets, force, settings, tokens)


@compress_app.command("distill")
def compress_distill_cmd(
    model: CompressModelOpt = None,
    out: CompressOutOpt = None,
    data: CompressDataOpt = None,
    tokens: Annotated[
        Path | None, typer.Option(help="Token shards made with the teacher's tokenizer.")
    ] = None,
    student: Annotated[str | None, typer.Option(help="Student preset, e.g. micro.")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Train a smaller student preset from the model (KL on softened logits + next-token CE).

    Example: lmforge compress distill --model runs/x/pretrain --data runs/x/data --tokens runs/x/tokens --out runs/x/student --student micro --set train.max_steps=300
    """
    _compress("distill", model, out, data, config, sets, force, {"student": student}, tokens)


@compress_app.command("export")
def compress_export_cmd(
    model: CompressModelOpt = None,
    out: CompressOutOpt = None,
    formats: Annotated[
        str | None, typer.Option(help="Comma list: onnx,gguf (default both).")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Export to ONNX (KV cache, checked with onnxruntime) and GGUF (checked by reading back;
    matrices f32, f16 or q8_0 with --set export.gguf_type=).

    Example: lmforge compress export --model runs/x/pretrain --out runs/x/export --formats onnx,gguf --set export.gguf_type=q8_0
    """
    listed = [f.strip() for f in formats.split(",")] if formats else None
    _compress("export", model, out, None, config, sets, force, {"formats": listed})
