"""The server's settings: which models, where the stores live, the limits.

One pydantic model so that `lmforge serve` flags, the LMFORGE_SERVE_CONFIG JSON that uvicorn's
worker processes read, and tests all describe a server the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.model.compiled_decode import DecodeCompile, compile_field
from lmforge.model.convert import model_display_name
from lmforge.serve.prefix_cache import DEFAULT_MB

ENV_CONFIG = "LMFORGE_SERVE_CONFIG"
ENV_API_KEY = "LMFORGE_API_KEY"


class ModelSpec(Section):
    name: str
    path: Path


class LoraSpec(Section):
    """A LoRA adapter served on a base model under its own name (vLLM's --lora-modules)."""

    name: str = Field(min_length=1, description="the `model` name requests pick it by")
    path: Path = Field(description="its PEFT adapter directory (adapter_config.json + weights)")
    base_model_name: str | None = Field(
        None, description="the served model it attaches to (default: its adapter_config.json's "
        "base_model_name_or_path, or the one model that generates)",
    )  # fmt: skip


class ServeSettings(Section):
    models: list[ModelSpec] = Field(min_length=1, description="models served, by name")
    loras: list[LoraSpec] = Field(
        default_factory=list, description="LoRA adapters served on the base models, each under "
        "its own name, their rows batched with the base's (serve/multi_lora.py)",
    )  # fmt: skip
    runtime_lora_updating: bool = Field(
        False, description="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
        "(vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING): adapters loaded and unloaded while running; "
        "one worker only",
    )  # fmt: skip
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_key: str | None = Field(None, description="Bearer key every /v1 route requires")
    workers: int = Field(1, ge=1, description="uvicorn worker processes behind the port")
    loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto", description="event loop: auto = uvloop when installed, else asyncio"
    )
    http: Literal["auto", "h11", "httptools"] = Field(
        "auto", description="HTTP/1.1 parser: auto = httptools when installed, else h11"
    )
    kb: Path | None = Field(None, description="documents directory of the knowledge base")
    kb_db: Path | None = Field(None, description="knowledge base index (default beside feedback)")
    safety: Path | None = Field(None, description="safety policy YAML")
    feedback_db: Path | None = Field(None, description="feedback SQLite file")
    max_batch_size: int = Field(32, ge=1)
    max_queue: int = Field(256, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    graceful_timeout_s: float = Field(30.0, ge=0)
    cache_entries: int = Field(1024, ge=0, description="response cache size; 0 = off")
    device: str = "auto"
    compile: DecodeCompile = compile_field()
    generation_config: Literal["auto", "none"] = Field(
        "auto", description="auto: a model's generation_config.json (or config.json) fills the "
        "request fields a request leaves unset (max_tokens, repetition_penalty, temperature/"
        "top_k/top_p under do_sample, no-repeat n-grams, min lengths, forced tokens), as vLLM's "
        "--generation-config auto; none: the server's own defaults only",
    )  # fmt: skip
    prefix_cache_mb: float = Field(
        DEFAULT_MB, ge=0, description="MiB of prompt keys/values each worker keeps per causal "
        "model for automatic prefix caching (a shared system prompt is prefilled once); 0 = off. "
        "The default holds ~40k tokens of the `small` preset (fp32), ~8k of a 1B bf16 Llama: "
        "several long shared prefixes, small next to the weights",
    )  # fmt: skip
    threads: int | None = Field(
        None, ge=1, description="torch threads per worker (default: usable CPUs / workers)"
    )
    embed_pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="/v1/embeddings pooling: auto = mean over an encoder's tokens, a "
        "decoder's last token; cls = an encoder's first token (serve/embeddings.py)",
    )  # fmt: skip
    embed_normalize: bool | None = Field(
        None, description="L2-normalise /v1/embeddings vectors; None (auto): as a "
        "sentence-transformers dir's modules.json says (a Normalize module), else on",
    )  # fmt: skip

    @model_validator(mode="after")
    def _names_once(self) -> ServeSettings:
        names = [m.name for m in self.models] + [a.name for a in self.loras]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"the name {dupes[0]!r} is given to two served models or adapters; "
                             "name each --model / --lora once")  # fmt: skip
        if self.runtime_lora_updating and self.workers > 1:
            raise ValueError("runtime LoRA updating needs --workers 1: a load would reach one "
                             "worker of several")  # fmt: skip
        return self

    def torch_threads(self) -> int | None:
        """Threads each worker's engines compute with: --threads, else OMP_NUM_THREADS (None:
        torch keeps it), else the usable CPUs shared among the workers, so several workers on
        one machine do not each start a pool as wide as all of it."""
        if self.threads is not None:
            return self.threads
        if os.environ.get("OMP_NUM_THREADS"):
            return None
        from lmforge.common.threads import usable_cpus

        return max(1, usable_cpus() // self.workers)

    def store_dir(self) -> Path:
        """Where the stores go by default: the first model's run directory, else the cwd."""
        return run_dir(self.models[0].path) or Path.cwd()

    def feedback_path(self) -> Path:
        return self.feedback_db or self.store_dir() / "feedback.db"

    def kb_path(self) -> Path:
        return self.kb_db or self.feedback_path().parent / "kb.db"

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get(ENV_API_KEY) or None


def run_dir(model_dir: Path) -> Path | None:
    """runs/q/sft/final (a stage's export, the stage dir holding manifest.json) -> runs/q."""
    model_dir = Path(model_dir)
    for stage_dir in (model_dir, model_dir.parent):
        if (stage_dir / "manifest.json").is_file():
            return stage_dir.parent
    return None


def parse_model_specs(values: list[str]) -> list[ModelSpec]:
    """`--model DIR` or `--model NAME=DIR`, each name once."""
    specs: list[ModelSpec] = []
    for value in values:
        name, sep, path = value.partition("=")
        if not sep:
            name, path = "", value
        if not Path(path).is_dir():
            raise ConfigError(f"--model {value}: {path} is not a directory (a model dir)")
        specs.append(ModelSpec(name=name or model_display_name(path), path=Path(path)))
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"--model: name {dupes[0]!r} is used twice; name them NAME=DIR")
    return specs


def parse_lora_specs(values: list[str]) -> list[LoraSpec]:
    """`--lora NAME=DIR`, or vLLM's JSON form {"name", "path", "base_model_name"}."""
    specs = []
    for value in values:
        if value.lstrip().startswith("{"):
            try:
                fields = json.loads(value)
                specs.append(LoraSpec.model_validate(fields))
            except (ValueError, ValidationError) as exc:
                raise ConfigError(f"--lora {value}: not a valid adapter object "
                                  f'{{"name", "path", "base_model_name"?}}: {exc}') from None  # fmt: skip
        else:
            name, sep, path = value.partition("=")
            if not sep or not name or not path:
                raise ConfigError(f"--lora {value}: give NAME=ADAPTER_DIR")
            specs.append(LoraSpec(name=name, path=Path(path)))
    for spec in specs:
        if not spec.path.is_dir():
            raise ConfigError(f"--lora {spec.name}={spec.path}: not a directory (a PEFT adapter)")
    return specs


def settings_from_env() -> ServeSettings:
    """The settings a uvicorn worker process was started with (JSON in LMFORGE_SERVE_CONFIG)."""
    raw = os.environ.get(ENV_CONFIG)
    if not raw:
        raise ConfigError(f"{ENV_CONFIG} is not set; start the server with `lmforge serve`")
    try:
        return ServeSettings.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ConfigError(f"{ENV_CONFIG}: {exc}") from None
