"""Reading a model directory's files: where the model is (a stage's final/), what it is called,
config.json, and its tensors (single-file or sharded safetensors, or legacy .bin read only through
torch.load(weights_only=True), which refuses anything but plain tensors)."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from lmforge.common.json_cache import read_json_object, read_json_value
from lmforge.errors import InputError
from lmforge.model.convert.mean_head import MEAN_HEAD, RERUN

log = logging.getLogger(__name__)

# what to do about a malformed config.json or shard index
SAVE_AGAIN = "mend it, or save the model again (an lmforge training stage or save_pretrained)"


def resolve_model_dir(path: Path | str) -> Path:
    """A model directory; a training stage's directory stands for its final/ model."""
    path = Path(path)
    if (transformer := _sentence_transformers_module_dir(path)) is not None:
        return transformer
    if (path / "config.json").exists():
        return path
    if (path / "final" / "config.json").exists():
        return path / "final"
    if (path / MEAN_HEAD).is_file():  # before final/ was written beside a mean-pooled head
        raise InputError(
            f"{path / MEAN_HEAD} is a mean-pooled classifier without its encoder's config.json "
            f"(an older lmforge wrote no final/); {RERUN} with --force to write final/"
        )
    return path


def _sentence_transformers_module_dir(path: Path) -> Path | None:
    """The model of sentence-transformers' older layout, whose modules.json puts its Transformer
    module (config.json, weights, tokenizer) in a folder of its own (0_Transformer/); None for
    any other directory (the top-level config.json there is sentence-transformers' own). A
    modules.json that is not JSON is an InputError naming it: the layout cannot be told."""
    if not (path / "modules.json").is_file():
        return None
    modules = read_json_value(
        path / "modules.json", "mend it, or save the model again with sentence-transformers"
    )
    try:
        sub = next(m["path"] for m in modules if m["type"].endswith(".models.Transformer"))
    except (TypeError, KeyError, AttributeError, StopIteration):
        return None  # no such layout (serve/embeddings_pooling names a module list it cannot use)
    return path / sub if sub and (path / sub / "config.json").is_file() else None


def model_display_name(model_dir: Path | str) -> str:
    """The name a model goes by in tables, the server and exports: its run stage when the
    directory is a stage's final/ model (runs/q/sft/final -> "sft"), else the directory's name."""
    model_dir = Path(model_dir).resolve()
    if model_dir.name == "final" and model_dir.parent.name:
        return model_dir.parent.name
    return model_dir.name


def _load_bin(path: Path) -> dict[str, Tensor]:
    log.warning("reading legacy pickle %s with weights_only=True; prefer safetensors", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(
            f"{path} holds pickled objects other than tensors; lmforge does not unpickle untrusted "
            "files. Convert it to model.safetensors with a tool you trust"
        ) from err


def read_tensors(model_dir: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory (single or sharded safetensors, or legacy .bin)."""
    for weights, index, loader in (
        ("model.safetensors", "model.safetensors.index.json", load_file),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _load_bin),
    ):
        if (model_dir / weights).exists():
            return loader(model_dir / weights)
        if (model_dir / index).exists():
            weight_map = _weight_map(model_dir / index)
            tensors: dict[str, Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                tensors.update(loader(model_dir / shard))
            return tensors
    raise InputError(
        f"{model_dir} has no model.safetensors (or model.safetensors.index.json); "
        "point --model at a directory written by lmforge or transformers' save_pretrained"
    )


def read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.exists():
        raise InputError(
            f"{path} not found; a model directory needs config.json + model.safetensors "
            "(written by lmforge pretrain/finetune or transformers' save_pretrained)"
        )
    return read_json_object(path, SAVE_AGAIN)  # parsed once while unchanged: a load asks often


def _weight_map(index: Path) -> dict[str, str]:
    """A sharded checkpoint's index (model.safetensors.index.json): tensor name -> shard file."""
    weight_map = read_json_object(index, SAVE_AGAIN).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise InputError(f"{index} has no weight_map of tensor name -> shard file; {SAVE_AGAIN}")
    return weight_map


def is_encoder_decoder(model_dir: Path | str) -> bool:
    """config.json of a BART/T5-family or lmforge Seq2SeqLM export: eval, serve and generate
    each pick their encoder-decoder path from it."""
    hf = read_config(resolve_model_dir(Path(model_dir)))
    return bool(hf.get("is_encoder_decoder")) or hf.get("model_type") in ("bart", "t5")


def read_tensor(model_dir: Path, name: str) -> Tensor | None:
    """One tensor of a checkpoint without reading the others (safetensors), or None."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shard = _weight_map(index).get(name)
        path = model_dir / shard if shard else None
    elif (model_dir / "model.safetensors").exists():
        path = model_dir / "model.safetensors"
    else:
        return read_tensors(model_dir).get(name)  # legacy .bin: no partial reads
    if path is None:
        return None
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None  # noqa: SIM118
