"""The model directory every compress method writes: weights, config, tokenizer, stop tokens."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.model.convert import read_config, save_pretrained
from lmforge.tokenizer.files import copy_tokenizer_files
from lmforge.tokenizer.generation import GENERATION_CONFIG, SPECIAL_KEYS


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files and generation_config.json of src, so dst is a complete model directory."""
    copy_tokenizer_files(src, dst)
    if (src / GENERATION_CONFIG).is_file():
        shutil.copy2(src / GENERATION_CONFIG, dst / GENERATION_CONFIG)


def special_ids(model_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids of config.json that are single ints."""
    hf = read_config(model_dir)
    return {k: hf[k] for k in SPECIAL_KEYS if type(hf.get(k)) is int}


def write_final(model: nn.Module, src: Path, ctx: Any) -> Path:
    """ctx.out/final: model saved (save_pretrained) with src's special ids and side files."""
    with ctx.atomic_path(ctx.out / "final") as tmp:
        save_pretrained(model, tmp, extra_config=special_ids(src))
        copy_side_files(src, tmp)
    return ctx.out / "final"
