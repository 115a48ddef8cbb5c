"""The `lmforge` command: one entry point, one thin subcommand per stage.

Each stage command gathers its flags into a dict and hands them to runner.run_single(), which
merges them over `--config FILE.yaml` and under `--set key=value`, validates, and runs the stage
with caching. No stage logic lives here. Errors a person can fix print as one line (exit 2);
failures while working exit 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from rich.markup import escape

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


@app.callback()
def _global_options(
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    log_json: Annotated[
        bool, typer.Option("--log-json", help="Log as JSON lines on stderr.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    setup_logging(quiet=quiet, log_json=log_json, verbose=verbose)


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


@app.command("run")
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


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (runs/<name>).")],
) -> None:
    """Write report.html and report.md for a run, from its manifests.

    Example: lmforge report runs/quickstart
    """
    from lmforge.evals.report import write_report

    html_path = write_report(run_dir)
    console().print(f"[green]✓[/green] report: {html_path}")


tokenizer_app = typer.Typer(help="Train a tokenizer and encode token shards.", no_args_is_help=True)
app.add_typer(tokenizer_app, name="tokenizer")


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


data_app = typer.Typer(help="Prepare a clean, deduplicated, split corpus.", no_args_is_help=True)
app.add_typer(data_app, name="data")


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
        Path | None, typer.Option(help="Directory: sft.jsonl, preferences.jsonl, manifest.json.")
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

    Writes sft.jsonl (well-rated responses, for `lmforge finetune --data`) and preferences.jsonl
    (choices, and differently-rated answers to one prompt, for `lmforge align --data`).

    Example: lmforge data feedback-export --db runs/serve/feedback.db --out runs/fb/export --min-rating 4
    """
    values = {"db": db, "out": out, "min_rating": min_rating}
    run_stage_command("feedback-export", values, config, sets, force)


@app.command("pretrain")
def pretrain_cmd(
    tokens: Annotated[
        Path | None, typer.Option(help="Token shard directory (lmforge tokenizer encode).")
    ] = None,
    tokenizer: Annotated[
        Path | None, typer.Option(help="Tokenizer directory the shards were made with.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: final/, checkpoints/, metrics.")
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Model preset (micro, tiny, small, gpt2-124m, llama-1b, bert-tiny, ...)."
        ),
    ] = None,
    objective: Annotated[
        str | None,
        typer.Option(help="clm (next token, decoders) | mlm (masked tokens, bert-* presets)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Pretrain a Transformer on token shards (resumes a killed run from its checkpoints).

    Example: lmforge pretrain --tokens runs/x/tokens --tokenizer runs/x/tokenizer --out runs/x/pretrain --set train.max_steps=200
    Masked LM (the tokenizer needs a mask token: tokenizer train --set special_tokens.mask='[MASK]'):
    lmforge pretrain --objective mlm --preset bert-tiny --tokens runs/x/tokens --tokenizer runs/x/tokenizer --out runs/x/mlm
    Distributed: torchrun --nproc-per-node 2 -m lmforge.cli pretrain ... --set train.distributed=ddp
    """
    values: dict[str, Any] = {"tokens": tokens, "tokenizer": tokenizer, "out": out}
    values["objective"] = objective
    if preset is not None:
        values["model"] = {"preset": preset}
    run_stage_command("pretrain", values, config, sets, force)


@app.command("eval")
def eval_cmd(
    model: Annotated[
        list[Path] | None,
        typer.Option("--model", help="Model directory (HF layout) or training stage; repeatable."),
    ] = None,
    tasks: Annotated[
        str | None,
        typer.Option(help="Comma-separated tasks: task YAML, JSONL examples or data directories."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: eval.json, errors, plots.")
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Evaluate one or more models on tasks and compare them in one table.

    Example: lmforge eval --model runs/x/pretrain --model runs/x/finetune --tasks runs/x/data,my_task.yaml --out runs/x/eval
    """
    values: dict[str, Any] = {"out": out}
    if model:
        values["models"] = [str(m) for m in model]
    if tasks:
        values["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    run_stage_command("eval", values, config, sets, force)


@app.command("finetune")
def finetune_cmd(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (HF layout + tokenizer files).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Data: .jsonl/.parquet file, directory or HF dataset.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Stage directory: final/, adapter/, metrics.")
    ] = None,
    method: Annotated[str | None, typer.Option(help="full | lora")] = None,
    task: Annotated[
        str | None,
        typer.Option(help="sft | classify | multitask | tag (encoders) | seq2seq (BART/T5)"),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Fine-tune a model: chat SFT, classification, tagging or seq2seq, full or LoRA (resumes).

    Example: lmforge finetune --model runs/x/pretrain/final --data runs/x/tasks/explain_train.jsonl --out runs/x/sft --method lora --set train.max_steps=200
    Token tagging on an encoder ({"tokens": [...], "tags": [...]} JSONL):
    lmforge finetune --model runs/mlm/pretrain --data ner.jsonl --task tag --out runs/mlm/ner
    Sentence pairs ({"text", "text_pair", "label"}) on an encoder, mean-pooled (not exportable):
    lmforge finetune --model runs/mlm/pretrain --data pairs.jsonl --task classify --out runs/mlm/nli --set pooling=mean
    An encoder-decoder on {"source", "target"} JSONL, from a BART/T5 dir or from scratch:
    lmforge finetune --model TOKENIZER_DIR --data pairs.jsonl --task seq2seq --out runs/s2s --set from_scratch=bart-micro
    """
    values: dict[str, Any] = {"model": model, "data": data, "out": out}
    values.update({k: v for k, v in (("method", method), ("task", task)) if v is not None})
    run_stage_command("finetune", values, config, sets, force)


compress_app = typer.Typer(
    help="Make a trained model smaller or portable: quantize, prune, distill, export.",
    no_args_is_help=True,
)
app.add_typer(compress_app, name="compress")

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
              extra: dict[str, Any]) -> None:  # fmt: skip
    values: dict[str, Any] = {"method": method, "model": model, "out": out, "data": data}
    run_stage_command("compress", {**values, **extra}, config, sets, force)


@compress_app.command("quantize")
def compress_quantize_cmd(
    model: CompressModelOpt = None,
    out: CompressOutOpt = None,
    data: CompressDataOpt = None,
    scheme: Annotated[str | None, typer.Option(help="int8 | int4 (weight-only)")] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Quantize every weight matrix to int8/int4 (out/final/ reloads without the original).

    Example: lmforge compress quantize --model runs/x/pretrain --data runs/x/data --out runs/x/int8 --scheme int8
    """
    extra = {"quantize": {"scheme": scheme}} if scheme else {}
    _compress("quantize", model, out, data, config, sets, force, extra)


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
    settings = {k: v for k, v in (("kind", kind), ("sparsity", sparsity)) if v is not None}
    extra: dict[str, Any] = {"prune": settings} if settings else {}
    if tokens is not None:
        extra["tokens"] = tokens
    _compress("prune", model, out, data, config, sets, force, extra)


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
    extra: dict[str, Any] = {"distill": {"student": student}} if student else {}
    if tokens is not None:
        extra["tokens"] = tokens
    _compress("distill", model, out, data, config, sets, force, extra)


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
    extra = {"export": {"formats": [f.strip() for f in formats.split(",")]}} if formats else {}
    _compress("export", model, out, None, config, sets, force, extra)


@app.command("align")
def align_cmd(
    model: Annotated[
        Path | None, typer.Option(help="Model directory (HF layout + tokenizer), e.g. the SFT one.")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Preference pairs: prompt/chosen/rejected or ranked JSONL, a feedback-export "
            "directory, or the serving feedback store (.db) itself."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Stage directory: final/, metrics.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="reward (reward model) | dpo (policy from pairs) | ppo (policy from a reward model)"
        ),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Align a model on preference pairs: a reward model, or a policy by DPO / IPO or PPO.

    Example: lmforge align --model runs/quickstart/sft --data runs/align/prefs/prefs_train.jsonl --out runs/x/dpo --method dpo --set dpo.beta=0.1
    """
    values: dict[str, Any] = {"model": model, "data": data, "out": out}
    if method is not None:
        values["method"] = method
    run_stage_command("align", values, config, sets, force)


@app.command("tune")
def tune_cmd(
    out: Annotated[
        Path | None,
        typer.Option(help="Stage directory: trials/ (runs, study.db), trials.csv, best.yaml."),
    ] = None,
    trials: Annotated[
        int | None, typer.Option(min=1, help="Trials to finish, over all workers of the study.")
    ] = None,
    sampler: Annotated[str | None, typer.Option(help="grid | random | tpe")] = None,
    pruner: Annotated[str | None, typer.Option(help="none | median | halving")] = None,
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna database URL shared by workers (default: OUT/trials/study.db)."),
    ] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Search hyperparameters of any stage with Optuna; each trial is a stage run in trials/<n>/.

    The YAML names the stage, its base config and the space of dotted keys, e.g.
    stage: pretrain, base: {tokens: ..., tokenizer: ...}, space: {train.lr: {low: 1e-4, high: 3e-2, log: true}}.
    Start the same command on more machines with one --storage URL to share the study.

    Example: lmforge tune --config tune.yaml --trials 20 --out runs/x/tune
    """
    values = {
        "out": out, "trials": trials, "sampler": sampler, "pruner": pruner, "storage": storage,
    }  # fmt: skip
    run_stage_command("tune", values, config, sets, force)


@app.command("generate")
def generate_cmd(
    model: Annotated[
        Path, typer.Option(help="Model directory (HF layout) or a training stage directory.")
    ],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help='File of prompts: one per line, or .jsonl with a "prompt" field.'),
    ] = None,
    chat: Annotated[
        bool, typer.Option(help="Send prompts as user turns through the chat template.")
    ] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most new tokens per answer.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy.")] = 0.0,
    top_k: Annotated[int | None, typer.Option(min=1, help="Sample among the k best.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass, in (0, 1].")] = None,
    repetition_penalty: Annotated[float, typer.Option(help="1 = off.")] = 1.0,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="Cut answers at this string (repeatable).")
    ] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="Answers per prompt.")] = 1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    out: Annotated[Path | None, typer.Option(help="Also write the answers here as JSONL.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
) -> None:
    """Generate text from a model: raw continuation, or chat answers with --chat.

    Example: lmforge generate --model runs/quickstart/sft --chat -p "What does os.path.join do?"
    """
    from lmforge.common.io import read_prompts, write_jsonl
    from lmforge.config import validate
    from lmforge.evals.lm import EvalModel, GenerationSettings
    from lmforge.evals.sample import sample

    settings = validate(GenerationSettings, {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k,
        "top_p": top_p, "repetition_penalty": repetition_penalty, "stop": stop or [],
        "seed": seed,
    }, where="generate")  # fmt: skip
    texts = [*(prompt or []), *(read_prompts(prompts) if prompts else [])]
    lm = EvalModel.load(model, device=device)
    rows = sample(lm, texts, settings, chat=chat, num_samples=num_samples, batch_size=batch_size)
    for row in rows:  # the answers are this command's data: stdout, even under --quiet
        typer.echo(f"> {row['prompt']}\n{row['completion']}\n")
    if out is not None:
        write_jsonl(out, rows)
        console().print(f"[green]✓[/green] {len(rows)} answers: {out}")


serve_app = typer.Typer(
    help="Serve models over an OpenAI-compatible HTTP API (and its tools: see commands).\n\n"
    "Example: lmforge serve --model runs/quickstart/sft/final --port 8000",
    invoke_without_command=True,
)
app.add_typer(serve_app, name="serve")


@serve_app.callback()
def serve_cmd(
    ctx: typer.Context,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Model dir, or NAME=DIR to serve it under NAME (repeatable)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(help="Require Authorization: Bearer KEY on /v1 (or env LMFORGE_API_KEY)."),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes behind the port.")] = 1,
    kb: Annotated[
        Path | None, typer.Option(help="Documents directory: retrieval-augmented chat.")
    ] = None,
    safety: Annotated[Path | None, typer.Option(help="Safety policy YAML.")] = None,
    feedback_db: Annotated[
        Path | None,
        typer.Option(help="Feedback SQLite file (default: <run dir or cwd>/feedback.db)."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Sequences decoded together per model.")
    ] = 32,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Waiting requests per model before 429.")
    ] = 256,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds before a request is aborted with 504.")
    ] = 120.0,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    config: Annotated[
        Path | None,
        typer.Option(
            help="serve.yaml (e.g. a recipe's serve-config stage): models, kb, safety, feedback "
            "from the file; host, port, api key, workers, limits and device from the flags."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch threads per worker (default: usable CPUs / workers, or OMP_NUM_THREADS).",
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API: /v1/completions, /v1/chat/completions
    (streaming), /v1/models, /v1/feedback, /metrics, /health, and the chat page at /.
    Encoder-decoder model directories (BART/T5 layout) are served too.

    Example: lmforge serve --model runs/quickstart/sft/final --model base=runs/quickstart/pretrain/final --api-key secret
    Example: lmforge serve --config runs/dialogue-assistant/serve_config/serve.yaml --port 8000
    """
    if ctx.invoked_subcommand is not None:
        return
    from lmforge.config import validate
    from lmforge.errors import ConfigError
    from lmforge.serve.settings import ServeSettings, parse_model_specs

    flags = {"host": host, "port": port, "workers": workers, "device": device,
             "max_batch_size": max_batch_size, "max_queue": max_queue,
             "request_timeout_s": request_timeout, "threads": threads}  # fmt: skip
    if config is not None:
        from lmforge.serve.recipe_config import load_serve_config

        base = load_serve_config(config)
        fields = {**base.model_dump(), **flags, "api_key": api_key or base.api_key}
    elif not model:
        raise ConfigError("lmforge serve needs --model DIR (or NAME=DIR); see --help")
    else:
        fields = {"models": parse_model_specs(model), "kb": kb, "safety": safety,
                  "feedback_db": feedback_db, **flags, "api_key": api_key}  # fmt: skip
    settings = validate(ServeSettings, fields, where="serve")
    from lmforge.serve.server import serve  # torch and FastAPI: only once the flags are right

    serve(settings)


@serve_app.command("bench")
def serve_bench_cmd(
    url: Annotated[
        str | None, typer.Option(help="A running server, e.g. http://127.0.0.1:8000.")
    ] = None,
    start_model: Annotated[
        Path | None,
        typer.Option(help="Start a server on this model dir (free local port) for the run."),
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Model name to request (default: the first listed).")
    ] = None,
    concurrency: Annotated[
        str, typer.Option(help="Comma-separated client counts, one level each.")
    ] = "1,4,16",
    requests: Annotated[int, typer.Option(min=1, help="Requests per level.")] = 32,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of every request.")] = 64,
    api_key: Annotated[
        str | None, typer.Option(help="Bearer key (also given to --start-model's server).")
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help='Prompts file: one per line, or .jsonl with a "prompt" field.'),
    ] = None,
    ignore_eos: Annotated[
        bool, typer.Option(help="Ask for exactly max_tokens per answer (vLLM's extension).")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the results as JSON.")] = None,
) -> None:
    """Load-test a server: streamed requests at each concurrency level; requests/s, output
    tokens/s, time to first token and inter-token latency (p50/p90/p99), errors.

    Example: lmforge serve bench --url http://127.0.0.1:8000 --concurrency 1,4,16 --requests 64 --max-tokens 64 --out bench.json
    """
    from lmforge.serve.bench import bench_command

    bench_command(
        url=url, start_model=start_model and str(start_model), model=model,
        concurrency=concurrency, requests=requests, max_tokens=max_tokens, api_key=api_key,
        prompts_file=prompts and str(prompts), out=out and str(out), ignore_eos=ignore_eos,
    )  # fmt: skip


@app.command("quickstart")
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


@app.command("config")
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
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        console().print("[red]interrupted[/red]")
        sys.exit(130)


if __name__ == "__main__":
    main()
