"""The LoRA adapters `lmforge serve --lora NAME=DIR` serves: which base each attaches to, and
each one read from its PEFT directory and checked against that base at start-up.

A directory is finetune/lora.py's PEFT output or Hugging Face PEFT's for an imported Llama,
Qwen2 or GPT-2 (the export's name table maps its modules onto ours). An adapter attaches to the
base its spec names (vLLM's base_model_name), else to the served model whose name or directory
is its adapter_config.json's base_model_name_or_path, else, when one model generates, to that
one. Whatever the base cannot run exactly is refused, naming the adapter and what to do: a rank
or shape that does not fit the base (another model size or vocabulary), a module the base lacks,
DoRA, trained biases, rank/alpha patterns, modules_to_save (whole replaced layers).

Each adapted linear's update is finetune/peft_adapter.py's exact reading (one A, or the fused
parts' A stacked with their B block-diagonal), alpha / r (alpha / sqrt(r) with rslora) folded
into B.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from lmforge.errors import ConfigError, InputError
from lmforge.finetune.peft_adapter import peft_scaling, read_peft_config, read_peft_updates


class AdapterNotServed(InputError):
    """A request names a LoRA adapter its engine does not serve (unloaded meanwhile): the
    server answers 404 model_not_found, as for any model it does not serve."""


@dataclass(frozen=True)
class AdapterUpdate:
    """One adapter read for a base: its updates by our linear's name, its own chat template."""

    name: str
    path: Path
    updates: dict[str, tuple[Tensor, Tensor]]  # linear -> (A (r, in), scaling * B (out, r))
    chat_template: str | None  # its directory's own, when it has one

    @functools.cached_property
    def key(self) -> str:
        """name@digest of its updates: what its rows' prefix-cache blocks are keyed by, so an
        adapter unloaded and loaded again under its name with other weights shares nothing
        with the old one, and the same weights again share. Hashed once (the weights are many
        MB; cached_property writes the instance's __dict__, which frozen does not guard)."""
        digest = hashlib.blake2b(digest_size=12)
        for module, (a, b) in sorted(self.updates.items()):
            digest.update(module.encode())
            digest.update(a.numpy().tobytes())
            digest.update(b.numpy().tobytes())
        return f"{self.name}@{digest.hexdigest()}"


def adapter_base(name: str, path: Path, asked: str | None, bases: dict[str, Path]) -> str:
    """The served model (of `bases`, name -> dir, those that generate) the adapter attaches to."""
    where = f"LoRA adapter {name!r} ({path})"
    if asked is not None:
        if asked not in bases:
            raise ConfigError(f"{where}: base_model_name {asked!r} is not a served model that "
                              f"generates; served: {', '.join(bases)}")  # fmt: skip
        return asked
    try:
        config = read_peft_config(path)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    wanted = str(config.get("base_model_name_or_path") or "")
    for base, base_dir in bases.items():
        if wanted and (wanted == base or _same_dir(wanted, base_dir)):
            return base
    if len(bases) == 1:
        return next(iter(bases))
    raise ConfigError(
        f"{where}: its base_model_name_or_path {wanted!r} is none of the served models "
        f"({', '.join(bases)}); name its base: --lora-modules "
        f'\'{{"name": "{name}", "path": "{path}", "base_model_name": "<one of them>"}}\''
    )


def _same_dir(wanted: str, base_dir: Path) -> bool:
    try:
        return Path(wanted).resolve() == Path(base_dir).resolve()
    except OSError:
        return False


def read_adapter(model: nn.Module, name: str, path: Path) -> AdapterUpdate:
    """The adapter at `path` as updates of `model`'s linears; InputError when it does not fit."""
    where = f"LoRA adapter {name!r} ({path})"
    try:
        updates, config = read_peft_updates(model, path)
        template = _checked_chat_template(Path(path), model.config.vocab_size)
    except InputError as exc:
        raise InputError(f"{where}: {exc}") from None
    scaling = peft_scaling(config)
    scaled = {module: (a, b * scaling) for module, (a, b) in updates.items()}
    return AdapterUpdate(name, Path(path), scaled, template)


def _checked_chat_template(path: Path, vocab_size: int) -> str | None:
    """The adapter directory's own chat template, as TokenizerFiles reads a model's. A directory
    that carries its own tokenizer must have the base's vocabulary: the base's embeddings and
    head are what its rows run through."""
    from lmforge.common.json_cache import read_json_object
    from lmforge.tokenizer.files import TOKENIZER_FIX, TokenizerFiles, dir_chat_template

    if not (path / "tokenizer.json").is_file():
        config = path / "tokenizer_config.json"
        found = read_json_object(config, TOKENIZER_FIX) if config.is_file() else {}
        return dir_chat_template(path, found)
    own = TokenizerFiles.load(path)
    if own.vocab_size > vocab_size:
        raise InputError(
            f"its tokenizer has {own.vocab_size} tokens, the base's embeddings {vocab_size}: it "
            "was trained with another vocabulary (added tokens); merge it into a model of that "
            "vocabulary and serve that model instead"
        )
    return own.chat_template
