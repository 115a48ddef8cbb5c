"""The finetune stage's data: train/val examples checked against --task, and the rows each task
trains on (packed chat, labeled texts, tagged words or source+target pairs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.augment import attach_augmented, refuse_augmented, separate_augmented
from lmforge.errors import ConfigError, InputError
from lmforge.finetune import heads, seq2seq, tagging
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.formats import is_classification, is_seq2seq, is_tagging, load_examples
from lmforge.finetune.sft import build_sft_rows
from lmforge.tokenizer.files import TokenizerFiles


@dataclass
class Prepared:
    """Everything the loop and the evaluation need, built once from the inputs."""

    train_rows: dict[str, np.ndarray]
    val_rows: dict[str, np.ndarray]
    val_examples: list[dict[str, Any]]
    labels: list[str]
    stats: dict[str, Any]


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = max(1, round(fraction * len(examples)))
    if len(examples) - n_val < 1:
        raise InputError(f"only {len(examples)} examples: too few to hold out validation data")
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


def _check_task(cfg: FinetuneConfig, path: Path, examples: list) -> None:
    for task, holds, what in (("seq2seq", is_seq2seq, "source+target"),
                              ("tag", is_tagging, "tokens+tags")):  # fmt: skip
        if (cfg.task == task) != holds(examples):
            if cfg.task == task:
                raise ConfigError(f"{path} does not hold {what} records, which --task {task} needs")
            raise ConfigError(f"{path} holds {what} records; use --task {task}")
        if cfg.task == task:
            return
    labeled = is_classification(examples)
    if cfg.task == "sft" and labeled:
        raise ConfigError(f"{path} holds text+label records; use --task classify (or multitask)")
    if cfg.task != "sft" and not labeled:
        raise ConfigError(f"{path} holds chat records; --task {cfg.task} needs text+label records")


def load_splits(cfg: FinetuneConfig) -> tuple[list, list]:
    """(train, val) examples: val from val_data, else a seeded share of data.

    Rows the data stage augmented are never held out: only originals are split, and an
    augmented row joins train when its source did (a copy of a val row would inflate val).
    """
    _, examples = load_examples(cfg.data)
    _check_task(cfg, cfg.data, examples)
    if cfg.val_data is None:
        originals, augmented = separate_augmented(examples)
        train_ex, val_ex = _split(originals, cfg.eval.val_fraction, cfg.train.seed)
        return attach_augmented(train_ex, augmented), val_ex
    _, val = load_examples(cfg.val_data)
    _check_task(cfg, cfg.val_data, val)
    refuse_augmented(val, str(cfg.val_data))
    return examples, val


def prepare(
    cfg: FinetuneConfig, tok: TokenizerFiles, train_ex: list, val_ex: list, labels: list[str]
) -> Prepared:
    """Training and validation rows for the task."""
    seq_len = cfg.train.seq_len
    if cfg.task == "seq2seq":
        ids = base_seq2seq_ids(cfg, tok)
        train_rows, cut = seq2seq.encode_pairs(tok, train_ex, ids, seq_len)
        val_rows, val_cut = seq2seq.encode_pairs(tok, val_ex, ids, seq_len)
        stats = {"examples": len(train_ex), "truncated": cut, "val_examples": len(val_ex),
                 "val_truncated": val_cut}  # fmt: skip
        return Prepared(train_rows, val_rows, val_ex, [], stats)
    if cfg.task == "sft":
        opts = {"truncation": cfg.sft.truncation, "packing": cfg.sft.packing}
        train_rows, stats = build_sft_rows(tok, train_ex, seq_len, **opts)
        val_rows, val_stats = build_sft_rows(tok, val_ex, seq_len, **opts)
        stats = {**stats, **{f"val_{k}": v for k, v in val_stats.items()}}
        return Prepared(train_rows, val_rows, val_ex, [], stats)
    index = {name: i for i, name in enumerate(labels)}
    if cfg.task == "tag":
        train_rows, cut = tagging.encode_tagged(tok, train_ex, index, seq_len)
        val_rows, val_cut = tagging.encode_tagged(tok, val_ex, index, seq_len)
        stats = {"examples": len(train_ex), "truncated": cut, "val_examples": len(val_ex),
                 "val_truncated": val_cut, "tags": len(labels)}  # fmt: skip
        return Prepared(train_rows, val_rows, val_ex, labels, stats)
    template = is_encoder(cfg.model_dir())  # an encoder reads [CLS] text [SEP] as pretrained

    def rows(examples: list) -> tuple[dict[str, np.ndarray], int]:
        texts, pairs = [e["text"] for e in examples], [e.get("text_pair") for e in examples]
        labels_ = [index[e["label"]] for e in examples]
        return heads.encode_texts(tok, texts, labels_, seq_len, pairs=pairs, template=template)

    train_rows, cut = rows(train_ex)
    val_rows, val_cut = rows(val_ex)
    stats = {"examples": len(train_ex), "truncated": cut, "val_examples": len(val_ex),
             "val_truncated": val_cut, "classes": len(labels)}  # fmt: skip
    return Prepared(train_rows, val_rows, val_ex, labels, stats)


def task_labels(cfg: FinetuneConfig, examples: list) -> list[str]:
    """The sorted class names (classify, multitask) or tag names (tag); none for sft."""
    if cfg.task == "tag":
        return sorted({t for e in examples for t in e["tags"]})
    return sorted({e["label"] for e in examples}) if cfg.task not in ("sft", "seq2seq") else []


def is_encoder(model_dir: Path) -> bool:
    """True when model_dir holds a bidirectional encoder (BERT/RoBERTa-style)."""
    from lmforge.model.convert import hf_config_to_model_config, read_config

    try:
        return not hf_config_to_model_config(read_config(model_dir)).causal
    except InputError as err:  # an unsupported or incomplete config.json: say whose
        raise InputError(f"{model_dir}: {err}") from None


def base_seq2seq_ids(cfg: FinetuneConfig, tok: TokenizerFiles) -> seq2seq.Seq2SeqIds:
    """The base model's special ids (none from scratch: the tokenizer's)."""
    from lmforge.model.convert import read_config

    base = {} if cfg.from_scratch else read_config(cfg.model_dir())
    return seq2seq.Seq2SeqIds.of(base, tok)
