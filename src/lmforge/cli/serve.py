"""`lmforge serve`: the OpenAI-compatible server (the group's own callback) and `serve bench`.

The flags are validated before torch and FastAPI are imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.serve.prefix_cache import DEFAULT_MB as DEFAULT_PREFIX_CACHE_MB

serve_app = typer.Typer(
    help="Serve models over an OpenAI-compatible HTTP API (and its tools: see commands).\n\n"
    "Example: lmforge serve --model runs/quickstart/sft/final --port 8000",
    invoke_without_command=True,
)


@serve_app.callback()
def serve_cmd(
    ctx: typer.Context,
    model: Annotated[
        list[str] | None,
        typer.Option("--model", help="Model dir, or NAME=DIR to serve it under NAME (repeatable)."),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            "--lora",
            "--lora-modules",
            help='LoRA adapter NAME=ADAPTER_DIR (or vLLM\'s JSON {"name", "path", '
            '"base_model_name"}) served on its base model under NAME, batched with the base\'s '
            "requests (repeatable).",
        ),
    ] = None,
    allow_runtime_lora_updating: Annotated[
        bool,
        typer.Option(
            help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING); one worker only."
        ),
    ] = False,
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
            help="serve.yaml (e.g. a recipe's serve-config stage): its settings, with any flag "
            "given on the command line overriding the file's value."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="torch threads per worker (default: usable CPUs / workers, or OMP_NUM_THREADS).",
        ),
    ] = None,
    compile: Annotated[
        str,
        typer.Option(
            help="torch.compile causal models' decoding step: off | on | auto (on for CUDA only)."
        ),
    ] = "off",
    generation_config: Annotated[
        str,
        typer.Option(
            help="auto: a model's generation_config fills the request fields a request leaves "
            "unset (max_tokens, repetition_penalty, sampling under do_sample, no-repeat n-grams, "
            "min lengths, forced tokens), as vLLM does | none: the server's own defaults."
        ),
    ] = "auto",
    prefix_cache_mb: Annotated[
        float,
        typer.Option(
            min=0,
            help="MiB of prompt keys/values kept per model and worker, so prompts sharing a prefix "
            "(a system prompt, few-shot examples) prefill it once; 0 = off.",
        ),
    ] = DEFAULT_PREFIX_CACHE_MB,
    loop: Annotated[
        str, typer.Option(help="Event loop: auto (uvloop when installed) | asyncio | uvloop.")
    ] = "auto",
    http: Annotated[
        str, typer.Option(help="HTTP parser: auto (httptools when installed) | h11 | httptools.")
    ] = "auto",
    embed_pooling: Annotated[
        str,
        typer.Option(
            help="/v1/embeddings pooling: auto (mean over an encoder's tokens, a decoder's last "
            "token) | mean | cls (an encoder's first token) | last."
        ),
    ] = "auto",
    embed_normalize: Annotated[
        bool | None,
        typer.Option(
            help="L2-normalise /v1/embeddings vectors (default: as a sentence-transformers "
            "dir's modules.json says, a Normalize module, as vLLM reads it; else on)."
        ),
    ] = None,
) -> None:
    """Serve models over an OpenAI-compatible API: /v1/completions, /v1/chat/completions
    (streaming), /v1/embeddings, /v1/models, /v1/feedback, /metrics, /health, and the chat page
    at /. Encoder-decoder model directories (BART/T5 layout) are served too; encoder directories
    (BERT/RoBERTa, classifiers' encoders) are embedding models: /v1/embeddings only.

    Example: lmforge serve --model runs/quickstart/sft/final --model base=runs/quickstart/pretrain/final --api-key secret
    Example: lmforge serve --config runs/dialogue-assistant/serve_config/serve.yaml --port 8000
    """
    if ctx.invoked_subcommand is not None:
        return
    from lmforge.config import validate
    from lmforge.errors import ConfigError
    from lmforge.serve.settings import ServeSettings, parse_lora_specs, parse_model_specs

    flags = {"host": host, "port": port, "workers": workers, "device": device,
             "max_batch_size": max_batch_size, "max_queue": max_queue,
             "request_timeout_s": request_timeout, "threads": threads,
             "compile": compile, "generation_config": generation_config, "loop": loop,
             "http": http, "prefix_cache_mb": prefix_cache_mb, "embed_pooling": embed_pooling,
             "embed_normalize": embed_normalize,
             "runtime_lora_updating": allow_runtime_lora_updating}  # fmt: skip
    if config is not None:
        from lmforge.serve.recipe_config import load_serve_config

        base = load_serve_config(config)
        given = {k: v for k, v in flags.items() if _given_on_command_line(ctx, k)}
        fields = {**base.model_dump(), **given, "api_key": api_key or base.api_key}
        fields["loras"] = [*fields["loras"], *parse_lora_specs(lora or [])]
    elif not model:
        raise ConfigError("lmforge serve needs --model DIR (or NAME=DIR); see --help")
    else:
        fields = {"models": parse_model_specs(model), "kb": kb, "safety": safety,
                  "feedback_db": feedback_db, **flags, "api_key": api_key,
                  "loras": parse_lora_specs(lora or [])}  # fmt: skip
    settings = validate(ServeSettings, fields, where="serve")
    from lmforge.serve.server import serve  # torch and FastAPI: only once the flags are right

    serve(settings)


def _given_on_command_line(ctx: typer.Context, setting: str) -> bool:
    """Whether the flag behind a ServeSettings field was typed (or came from the environment),
    not left at its default: only such flags override a serve.yaml's values."""
    param = {"request_timeout_s": "request_timeout",
             "runtime_lora_updating": "allow_runtime_lora_updating"}.get(setting, setting)  # fmt: skip
    source = ctx.get_parameter_source(param)
    return source is not None and source.name != "DEFAULT"


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
