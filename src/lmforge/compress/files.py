"""The model directory every compress method writes: weights, config, tokenizer, stop tokens."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.model.convert import read_config, save_pretrained
from lmforge.tokenizer.files import TOKENIZER_FILES
from lmforge.tokenizer.generation import GENERATION_CONFIG

SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def copy_side_files(src: Path, dst: Path) -> None:
    """Tokenizer files and generation_config.json of src, so dst is a complete model directory."""
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


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
