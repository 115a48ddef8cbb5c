"""How /v1/embeddings pools a model's hidden states, and which pooling a model directory gets.

`pool_states` reads the final hidden states of right-padded rows:
- "mean": the mean over the real tokens (finetune.heads.mean_pool, the function the mean-pooled
  classifier trains with), an encoder's default (sentence-transformers' default too);
- "cls": the first token's state ([CLS] / <s>), without BERT's pooler dense, as vLLM's CLS
  pooling; encoders only (a causal model's first token has seen only itself);
- "last": the last real token's state, a decoder's default (e5-mistral's and vLLM's for causal
  embedding models): the only position that has read the whole text.

Which one (`lmforge serve --embed-pooling`, default auto): a pooling named on the command line;
under auto, the one a sentence-transformers checkpoint was trained with (`checkpoint_pooling`:
modules.json's Pooling module, e.g. BGE's CLS, MiniLM's mean), as vLLM reads it; else mean for an
encoder and last for a decoder (`resolve_pooling`). Normalising likewise follows modules.json
where there is one (`checkpoint_normalize`: a Normalize module or not), as vLLM does, and so does
the longest input (`checkpoint_max_length`: sentence_bert_config.json's max_seq_length, which vLLM
makes the model's max length: a longer input is refused unless truncate_prompt_tokens cuts it).
A modules.json is always checked, flags or not: a module this server does not apply (a Dense
projection) would change the vectors. sentence-transformers' older layout, the Transformer module
in 0_Transformer/, is read there (model.convert.resolve_model_dir loads the model from it).
Shorter vectors (`dimensions`) only for a Matryoshka model, as vLLM decides it: its config.json
lists `matryoshka_dimensions` or says `is_matryoshka` (`checkpoint_matryoshka`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from lmforge.common.json_cache import read_json_value
from lmforge.errors import ConfigError
from lmforge.finetune.heads import mean_pool

ST_MODULES = "modules.json"  # sentence-transformers' list of modules, the Pooling one's path
ST_POOLING = "sentence_transformers.models.Pooling"
ST_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
            "pooling_mode_lasttoken": "last"}  # fmt: skip
ST_NORMALIZE = "sentence_transformers.models.Normalize"
ST_FIX = "mend it, or save the model again with sentence-transformers"  # model.convert.files' too
ST_TRANSFORMER = "sentence_transformers.models.Transformer"
ST_APPLIED = {ST_TRANSFORMER, ST_POOLING, ST_NORMALIZE}
ST_CONFIG = "sentence_bert_config.json"  # in the Transformer module's folder: max_seq_length

POOLINGS = ("auto", "mean", "cls", "last")


def resolve_pooling(pooling: str, causal: bool, name: str) -> str:
    """The pooling a model gets: auto -> mean (encoder) or last (decoder); cls on a decoder is a
    ConfigError naming the model."""
    if pooling not in POOLINGS:
        raise ConfigError(f"--embed-pooling {pooling!r}: valid: {', '.join(POOLINGS)}")
    if pooling == "auto":
        return "last" if causal else "mean"
    if pooling == "cls" and causal:
        raise ConfigError(
            f"--embed-pooling cls: {name} is a causal model, whose first token has seen only "
            "itself; use last (its default) or mean"
        )
    return pooling


def pool_states(h: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """(B, C) pooled states of h (B, T, C), right-padded rows whose real tokens mask (B, T)
    marks; pooling "mean", "cls" or "last" (module docstring)."""
    if pooling == "mean":
        return mean_pool(h, mask)
    if pooling == "cls":
        return h[:, 0]
    last = mask.sum(1) - 1  # (B,) each row's last real position
    return h[torch.arange(h.size(0), device=h.device), last]


def checkpoint_pooling(model_dir: Path | str) -> str | None:
    """The pooling a sentence-transformers directory's Pooling module names, None for a
    directory without modules.json. A module this server does not apply (Dense, a pooling mode
    other than mean/cls/last, or several at once) is a ConfigError naming the file: its
    vectors would not be the ones the model was trained to give."""
    found = _st_modules(model_dir)
    if found is None:
        return None
    model_dir, modules = found
    pooling = next((m for m in modules if m.get("type") == ST_POOLING), None)
    if pooling is None:
        return None
    config_path = model_dir / str(pooling.get("path", "")) / "config.json"
    config = _read_json(config_path, "its Pooling module's config")
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a JSON object of pooling_mode_* keys")
    modes = sorted(k for k, v in config.items() if k.startswith("pooling_mode_") and v is True)
    if len(modes) != 1 or modes[0] not in ST_MODES:
        raise ConfigError(
            f"{config_path}: pooling {'+'.join(modes) or 'none'}; /v1/embeddings pools one of "
            f"{', '.join(ST_MODES)}: pass --embed-pooling mean|cls|last to choose one"
        )
    return ST_MODES[modes[0]]


def checkpoint_normalize(model_dir: Path | str) -> bool | None:
    """Whether a sentence-transformers directory's vectors are L2-normalised: its modules.json
    lists a Normalize module (as vLLM reads it); None for a directory without modules.json."""
    found = _st_modules(model_dir)
    return None if found is None else any(m.get("type") == ST_NORMALIZE for m in found[1])


def checkpoint_max_length(model_dir: Path | str) -> int | None:
    """The max_seq_length of a sentence-transformers directory's Transformer module
    (sentence_bert_config.json beside its config.json), None without one. Reading it checks
    modules.json whatever the flags say (_st_modules refuses a module it does not apply)."""
    found = _st_modules(model_dir)
    if found is None:
        return None
    model_dir, modules = found
    transformer = next((m for m in modules if m.get("type") == ST_TRANSFORMER), {})
    path = model_dir / str(transformer.get("path", "")) / ST_CONFIG
    if not path.is_file():
        return None
    config = _read_json(path, "its Transformer module's config")
    length = config.get("max_seq_length") if isinstance(config, dict) else None
    if length is None:
        return None
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"{path}: max_seq_length {length!r} is not a positive whole number of "
                          "tokens; mend it or remove the key")  # fmt: skip
    return length


def checkpoint_matryoshka(model_dir: Path | str) -> tuple[int, ...] | None:
    """The sizes a Matryoshka model's vectors may be cut to, as vLLM reads its config.json: its
    matryoshka_dimensions, or () (any size) under is_matryoshka true; None for any other model,
    whose vectors are not trained to be cut."""
    from lmforge.model.convert import read_config, resolve_model_dir

    model_dir = resolve_model_dir(Path(model_dir))
    config = read_config(model_dir)
    dims = config.get("matryoshka_dimensions")
    if dims is None:
        return () if config.get("is_matryoshka") is True else None
    if not isinstance(dims, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims
    ):
        raise ConfigError(f"{model_dir / 'config.json'}: matryoshka_dimensions {dims!r} is not a "
                          "list of positive sizes; mend it or remove the key")  # fmt: skip
    return tuple(sorted(set(dims)))


def _st_modules(model_dir: Path | str) -> tuple[Path, list[dict]] | None:
    """(the directory holding modules.json, its modules) of a sentence-transformers directory,
    checked: only modules this server applies; None without modules.json. The directory is the
    one given (the older layout's model is in a subfolder), else its resolved model dir (a
    stage's final/)."""
    from lmforge.model.convert import resolve_model_dir

    model_dir = Path(model_dir)
    if not (model_dir / ST_MODULES).is_file():
        model_dir = resolve_model_dir(model_dir)
    path = model_dir / ST_MODULES
    if not path.is_file():
        return None
    modules = _read_json(path, "sentence-transformers' module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError(f"{path}: expected a JSON list of modules ({{\"type\": ..., "
                          "\"path\": ...}}); mend it or serve the directory without it")  # fmt: skip
    other = sorted({str(m.get("type", "?")) for m in modules} - ST_APPLIED)
    if other:
        raise ConfigError(f"{path} lists {', '.join(other)}, which /v1/embeddings does not apply; "
                          "serve a directory without it (or without modules.json)")  # fmt: skip
    return model_dir, modules


def _read_json(path: Path, what: str) -> object:
    """path's JSON: a malformed file is read_json_value's InputError naming it, as
    model.convert's read of the same modules.json; a missing one a ConfigError naming it."""
    try:
        return read_json_value(path, ST_FIX)
    except FileNotFoundError:
        raise ConfigError(f"{path} ({what}) is missing; restore it, or pass --embed-pooling "
                          "mean|cls|last") from None  # fmt: skip
