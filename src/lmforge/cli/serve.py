"""`lmforge serve`: the OpenAI-compatible server (the group's own callback) and `serve bench`.

The flags are validated before FastAPI and the models are loaded (serve.settings imports torch
through model.convert, so a bad flag still costs torch's import).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmforge.serve.prefix_cache import DEFAULT_MB as DEFAULT_PREFIX_CACHE_MB

if TYPE_CHECKING:
    from lmforge.serve.settings import ServeSettings

serve_app = typer.Typer(
    help="Serve models over an OpenAI-compatible HTTP API (and its tools: see commands).\n\n"
    "Example: lmforge serve --model runs/quickstart/sft/final --port 8000",
    invoke_without_command=True,
)

# `lmforge serve`'s options, declared once here so that the command's signature reads as a list.
# What is served
ModelOpt = Annotated[
    list[str] | None,
    typer.Option("--model", help="Model dir, or NAME=DIR to serve it under NAME (repeatable)."),
]
LoraOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--lora",
        "--lora-modules",
        help='LoRA adapter NAME=ADAPTER_DIR (or vLLM\'s JSON {"name", "path", '
        '"base_model_name"}) served on its base model under NAME, batched with the base\'s '
        "requests (repeatable).",
    ),
]
RuntimeLoraOpt = Annotated[
    bool,
    typer.Option(
        help="Serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING); one worker only."
    ),
]
# The HTTP side
HostOpt = Annotated[str, typer.Option(help="Address to bind.")]
PortOpt = Annotated[int, typer.Option(help="Port to listen on.")]
ApiKeyOpt = Annotated[
    str | None,
    typer.Option(help="Require Authorization: Bearer KEY on /v1 (or env LMFORGE_API_KEY)."),
]
WorkersOpt = Annotated[int, typer.Option(min=1, help="Worker processes behind the port.")]
# The stores beside the models
KbOpt = Annotated[Path | None, typer.Option(help="Documents directory: retrieval-augmented chat.")]
SafetyOpt = Annotated[Path | None, typer.Option(help="Safety policy YAML.")]
FeedbackDbOpt = Annotated[
    Path | None,
    typer.Option(help="Feedback SQLite file (default: <run dir or cwd>/feedback.db)."),
]
# Batching and limits
MaxBatchOpt = Annotated[int, typer.Option(min=1, help="Sequences decoded together per model.")]
MaxQueueOpt = Annotated[int, typer.Option(min=1, help="Waiting requests per model before 429.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds before a request is aborted with 504.")]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda")]
ServeConfigOpt = Annotated[
    Path | None,
    typer.Option(
        help="serve.yaml (e.g. a recipe's serve-config stage): its settings, with any flag "
        "given on the command line overriding the file's value (--model replaces its models, "
        "--lora adds to its adapters); flags left out keep the file's values."
    ),
]
ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="torch threads per worker (default: usable CPUs / workers, or OMP_NUM_THREADS).",
    ),
]
# Decoding
CompileOpt = Annotated[
    str,
    typer.Option(
        help="torch.compile causal models' decoding step: off | on | auto (on for CUDA only)."
    ),
]
GenerationConfigOpt = Annotated[
    str,
    typer.Option(
        help="auto: a model's generation_config fills the request fields a request leaves "
        "unset (max_tokens, repetition_penalty, sampling under do_sample, no-repeat n-grams, "
        "min lengths, forced tokens), as vLLM does | none: the server's own defaults."
    ),
]
PrefixCacheOpt = Annotated[
    float,
    typer.Option(
        min=0,
        help="MiB of prompt keys/values kept per model and worker, so prompts sharing a prefix "
        "(a system prompt, few-shot examples) prefill it once; 0 = off.",
    ),
]
# The event loop and HTTP parser uvicorn runs
LoopOpt = Annotated[
    str, typer.Option(help="Event loop: auto (uvloop when installed) | asyncio | uvloop.")
]
HttpOpt = Annotated[
    str, typer.Option(help="HTTP parser: auto (httptools when installed) | h11 | httptools.")
]
# /v1/embeddings
EmbedPoolingOpt = Annotated[
    str,
    typer.Option(
        help="/v1/embeddings pooling: auto (mean over an encoder's tokens, a decoder's last "
        "token) | mean | cls (an encoder's first token) | last."
    ),
]
EmbedNormalizeOpt = Annotated[
    bool | None,
    typer.Option(
        help="L2-normalise /v1/embeddings vectors (default: as a sentence-transformers "
        "dir's modules.json says, a Normalize module, as vLLM reads it; else on)."
    ),
]

# Flags that set the ServeSettings field of their name (or of the name given here) and, with
# --config, override the file's value when typed on the command line.
SETTING_FLAGS = {
    "host": "host", "port": "port", "workers": "workers", "kb": "kb", "safety": "safety",
    "feedback_db": "feedback_db", "device": "device", "max_batch_size": "max_batch_size",
    "max_queue": "max_queue", "request_timeout": "request_timeout_s", "threads": "threads",
    "compile": "compile", "generation_config": "generation_config", "loop": "loop",
    "http": "http", "prefix_cache_mb": "prefix_cache_mb", "embed_pooling": "embed_pooling",
    "embed_normalize": "embed_normalize", "allow_runtime_lora_updating": "runtime_lora_updating",
}  # fmt: skip


@serve_app.callback()
def serve_cmd(
    ctx: typer.Context,
    model: ModelOpt = None,
    lora: LoraOpt = None,
    allow_runtime_lora_updating: RuntimeLoraOpt = False,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    api_key: ApiKeyOpt = None,
    workers: WorkersOpt = 1,
    kb: KbOpt = None,
    safety: SafetyOpt = None,
    feedback_db: FeedbackDbOpt = None,
    max_batch_size: MaxBatchOpt = 32,
    max_queue: MaxQueueOpt = 256,
    request_timeout: TimeoutOpt = 120.0,
    device: DeviceOpt = "auto",
    config: ServeConfigOpt = None,
    threads: ThreadsOpt = None,
    compile: CompileOpt = "off",
    generation_config: GenerationConfigOpt = "auto",
    prefix_cache_mb: PrefixCacheOpt = DEFAULT_PREFIX_CACHE_MB,
    loop: LoopOpt = "auto",
    http: HttpOpt = "auto",
    embed_pooling: EmbedPoolingOpt = "auto",
    embed_normalize: EmbedNormalizeOpt = None,
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
    settings = serve_settings(ctx)  # the flags, as ctx.params holds them by name
    from lmforge.serve.server import serve  # torch and FastAPI: only once the flags are right

    serve(settings)


def serve_settings(ctx: typer.Context) -> ServeSettings:
    """ServeSettings from the flags (ctx.params): a --config file's settings with the flags
    typed on the command line over them (--model's models replace the file's, --lora's
    adapters join its own), else the flags alone (--model required)."""
    from lmforge.config import validate
    from lmforge.errors import ConfigError
    from lmforge.serve.settings import ServeSettings, parse_lora_specs, parse_model_specs

    flag, config = ctx.params, ctx.params["config"]
    fields = {f: flag[p] for p, f in SETTING_FLAGS.items()
              if config is None or _given_on_command_line(ctx, p)}  # fmt: skip
    if flag["model"]:
        fields["models"] = parse_model_specs(flag["model"])
    elif config is None:
        raise ConfigError("lmforge serve needs --model DIR (or NAME=DIR); see --help")
    loras = parse_lora_specs(flag["lora"] or [])
    if config is not None:  # the file's settings under the flags typed; --lora adds adapters
        from lmforge.serve.recipe_config import load_serve_config

        base = load_serve_config(config).model_dump()
        fields = {**base, **fields, "api_key": flag["api_key"] or base["api_key"],
                  "loras": [*base["loras"], *loras]}  # fmt: skip
    else:
        fields.update(api_key=flag["api_key"], loras=loras)
    return validate(ServeSettings, fields, where="serve")


def _given_on_command_line(ctx: typer.Context, param: str) -> bool:
    """Whether a flag was typed (or came from the environment), not left at its default: only
    such flags override a serve.yaml's values."""
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
