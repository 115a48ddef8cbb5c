"""A model directory loaded for serving: the model on its device and dtype, its tokenizer files,
its generation config (the stop set), its display name and, unless turned off, the defaults its
generation_config gives the request fields a request leaves unset (serve/request_defaults.py);
and what a directory can serve (`model_tasks`), read from its config.json before loading.

device "auto" is CUDA when available, else CPU. dtype defaults to config.json's torch_dtype, but
float16 becomes float32 on CPU, where half matmuls are slow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.serve.request_defaults import NO_DEFAULTS, RequestDefaults, read_request_defaults
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import load_generation_config


@dataclass(frozen=True)
class ModelTasks:
    """What `lmforge serve` does with a model directory."""

    generate: bool  # completions and chat (a decoder, or an encoder-decoder)
    embed: bool  # /v1/embeddings (an encoder, or a decoder)


def model_tasks(model_dir: Path | str) -> ModelTasks:
    """An encoder (BERT/RoBERTa, a classifier's or mean-pooled classifier's encoder) embeds only,
    as vLLM serves pooling models; a decoder generates and embeds (last-token pooling); an
    encoder-decoder generates only."""
    from lmforge.model.convert import is_encoder_decoder, read_config, resolve_model_dir
    from lmforge.model.convert.hf_import import hf_config_to_model_config

    if is_encoder_decoder(model_dir):
        return ModelTasks(generate=True, embed=False)
    try:
        cfg = hf_config_to_model_config(read_config(resolve_model_dir(Path(model_dir))))
    except InputError as err:  # an unsupported or incomplete config.json: say whose
        raise InputError(f"{model_dir}: {err}") from None
    return ModelTasks(generate=cfg.causal, embed=True)


@dataclass
class ServedModel:
    """What an engine is built from."""

    model: nn.Module
    files: TokenizerFiles
    generation_config: dict[str, Any]
    name: str  # the name given, else the directory's display name (runs/q/sft/final -> sft)
    request_defaults: RequestDefaults = NO_DEFAULTS  # its generation_config's request defaults


def load_served_model(
    model_dir: Path | str,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: torch.dtype | None = None,
    request_defaults: bool = True,
) -> ServedModel:
    """Loads an lmforge export or HF checkpoint directory on `device` in `dtype` (see module);
    request_defaults: read its generation_config's defaults for unset request fields."""
    from lmforge.model.convert import (
        load_pretrained,
        model_display_name,
        read_config,
        resolve_model_dir,
    )

    model_dir = resolve_model_dir(Path(model_dir))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = getattr(torch, str(read_config(model_dir).get("torch_dtype", "float32")))
        if device == "cpu" and dtype == torch.float16:
            dtype = torch.float32
    files = TokenizerFiles.load(model_dir)
    model = load_pretrained(model_dir, device=device, dtype=dtype)
    gen = load_generation_config(model_dir, files)
    defaults = (
        read_request_defaults(model_dir, bool(getattr(model.config, "is_encoder_decoder", False)))
        if request_defaults
        else NO_DEFAULTS
    )
    return ServedModel(model, files, gen, name or model_display_name(model_dir), defaults)
