"""The model directory every compress method writes: weights, config, tokenizer, stop tokens,
and a classifier's head (a mean-pooled one's file, model.convert.mean_head), which quantize and
prune carry (they keep n_embd; prune's recovery of a classifier trains it; distill refuses
classifiers, compress.stage)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from lmforge.model.convert import (
    MEAN_HEAD,
    MEAN_HEAD_KEY,
    ClassifierHead,
    load_classifier,
    read_config,
    save_pretrained,
)
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


def input_length(model_dir: Path) -> dict[str, int]:
    """The input length a fine-tuned classifier's config.json records (the seq_len eval cuts its
    texts at, evals.heads), {} when none: carried so the result reads texts as the source did."""
    from lmforge.finetune.heads import SEQ_LEN_KEY

    hf = read_config(model_dir)
    return {SEQ_LEN_KEY: hf[SEQ_LEN_KEY]} if SEQ_LEN_KEY in hf else {}


def copy_mean_head(src: Path, dst: Path) -> None:
    """src's mean-pooled head file (config.json names it, or it is there) copied to dst, for an
    output not written by save_pretrained whose config.json is src's (quantize, ONNX)."""
    if not (read_config(src).get(MEAN_HEAD_KEY) or (src / MEAN_HEAD).is_file()):
        return
    load_classifier(src)  # InputError for a missing or foreign head file, naming the rerun
    shutil.copy2(src / MEAN_HEAD, dst / MEAN_HEAD)


def write_final(
    model: nn.Module,
    src: Path,
    ctx: Any,
    head: ClassifierHead | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """ctx.out/final: model saved (save_pretrained) with src's special ids, recorded input
    length, side files and classifier head, if any (prune keeps n_embd, the width a head reads):
    a *For{Sequence,Token}Classification's in the model file, a mean-pooled one's beside it.
    head: one trained with model (prune's recovery) instead of src's; extra: config.json keys."""
    head = head or load_classifier(src)
    with ctx.atomic_path(ctx.out / "final") as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        config = special_ids(src) | input_length(src) | (extra or {})
        save_pretrained(model, tmp, extra_config=config, classifier=head)
        copy_side_files(src, tmp)
    return ctx.out / "final"
