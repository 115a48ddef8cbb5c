"""The `finetune` stage: SFT, classification or both, full or LoRA, through the one training loop.

Inputs: a model directory in Hugging Face layout with its tokenizer files (our pretrain's final/
or an imported checkpoint) and a data file or directory (formats.py). The methods differ only in
what they hand the loop: rows (packed chat with assistant-only labels, or padded labeled texts),
the trainable parameters (LoRA adapters, or the model minus frozen parts, in layer-wise LR
groups) and the loss_fn. Outputs: final/ (the merged model, its generation_config.json (the
stop tokens of the chat template it was tuned on) and tokenizer files; for classify and
multitask the model is a Hugging Face *ForSequenceClassification with id2label and the pad id
its inputs are pooled by, see lmforge.model.convert; a mean-pooled encoder classifier is the
encoder plus model.convert.MEAN_HEAD beside it), adapter/ (PEFT format, LoRA only),
metrics.jsonl, loss.png, checkpoints/ (a killed run resumes), and headline metrics in the manifest.

The pieces: config (FinetuneConfig), prepare (examples -> rows), fit (the task's model through
the one loop), task_eval (held-out text metrics), cross_validate (k-fold); this module runs them
in order and writes the outputs.

A classifier's final/ has no LM head when the model's embeddings are untied (transformers'
classifiers carry none), so multitask's trained lm_head survives only in tied models. A base model
that is itself a classifier with the same label set starts the head from its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.logging import read_metrics
from lmforge.data.augment import Augmenter
from lmforge.errors import ConfigError
from lmforge.evals.metrics import tag_metrics
from lmforge.finetune import heads, tagging
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.cross_validate import cross_validate
from lmforge.finetune.export import export_model
from lmforge.finetune.fit import fit
from lmforge.finetune.lora import trainable_fraction
from lmforge.finetune.prepare import base_seq2seq_ids, load_splits, prepare, task_labels
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.finetune.task_eval import rounded, seq2seq_val_metrics, sft_val_metrics
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.train.checkpoint import forget_other_runs
from lmforge.train.observe import plot_losses

MODEL_HINT = "lmforge pretrain --tokens DIR --tokenizer DIR --out DIR (its final/ directory)"


def finetune(cfg: FinetuneConfig, force: bool = False) -> Path:
    """Runs (or reuses) the finetune stage; returns its directory (final/ holds the model)."""
    return run_stage("finetune", cfg, build, force=force).out


def build(cfg: FinetuneConfig, ctx: StageContext) -> dict[str, Any]:
    """Prepares data, trains, evaluates and writes final/ (+ adapter/); returns headlines."""
    needed = ["tokenizer.json"] if cfg.from_scratch else ["config.json"]
    require_artifact(cfg.model_dir(), needed, hint=MODEL_HINT)
    tok = load_chat_tokenizer(cfg.model_dir())
    train_ex, val_ex = load_splits(cfg)
    labels = task_labels(cfg, train_ex + val_ex)
    headline: dict[str, Any] = {}
    augmenter = _augmenter(cfg)
    if cfg.kfold.k > 1:
        if cfg.task in ("sft", "tag", "seq2seq"):
            raise ConfigError("kfold.k > 1 needs labeled data (--task classify or multitask)")
        headline.update(cross_validate(cfg, ctx, tok, train_ex + val_ex, labels, augmenter))
    if augmenter is not None:
        augmenter.counts.clear()  # the folds' copies are counted in folds/augment_compare.json
        train_ex = train_ex + augmenter.augment(train_ex, "train")
        headline.update({f"augmented_{k}": v for k, v in augmenter.counts.items()})
    forget_other_runs(ctx.out / "checkpoints", ctx.run_hash)
    data = prepare(cfg, tok, train_ex, val_ex, labels)
    ctx.log.info("finetune %s/%s: %s", cfg.task, cfg.method, data.stats)
    model, lm, result = fit(cfg, ctx, data)
    trainable, total = trainable_fraction(model)
    headline.update(
        train_loss=rounded(result.train_loss), val_loss=rounded(result.val_loss), steps=result.step,
        trainable_params=trainable, total_params=total,
        trainable_fraction=round(trainable / total, 5), resumed_from_step=result.resumed_from,
        **{f"data_{k}": v for k, v in data.stats.items() if k in ("examples", "rows", "truncated", "dropped")},
    )  # fmt: skip
    if cfg.task == "sft":
        headline.update(sft_val_metrics(cfg, tok, model, data))
    elif cfg.task == "seq2seq":
        headline.update(seq2seq_val_metrics(cfg, ctx, tok, model, data))
    elif cfg.task == "tag":
        gold = [r[r != heads.IGNORE_INDEX].tolist() for r in data.val_rows["tag_labels"]]
        preds = tagging.predict_tags(model, data.val_rows)
        headline.update(tag_metrics(gold, preds, labels))
    else:
        preds = heads.predict(model, data.val_rows)
        headline.update(
            heads.classification_metrics(data.val_rows["class_labels"], preds, len(labels))
        )
    _write_outputs(cfg, ctx, tok, model, lm, labels)
    if cfg.task == "classify" and cfg.pooling == "mean":
        from lmforge.model.convert import MEAN_HEAD

        headline["export"] = (
            f"final/ holds the encoder and its head as {MEAN_HEAD}: no transformers "
            "*ForSequenceClassification pools the mean (lmforge eval reloads it)"
        )
    return headline


def _write_outputs(
    cfg: FinetuneConfig,
    ctx: StageContext,
    tok: TokenizerFiles,
    model: nn.Module,
    lm: nn.Module,
    labels: list[str],
) -> None:
    """adapter/ (LoRA), final/ (merged model + generation_config.json, or classifier; tokenizer
    files), loss.png."""
    classifier, seq2seq_ids = None, None
    if cfg.task == "seq2seq":
        seq2seq_ids = base_seq2seq_ids(cfg, tok).config(tok.bos_id)
    elif cfg.task != "sft":
        classifier = model.classifier_head(labels)
    # a classifier pools by the pad id encode_texts padded with
    export_model(ctx, cfg.model_dir(), lm, tok, classifier=classifier, seq2seq_ids=seq2seq_ids,
                 seq_len=cfg.train.seq_len)  # fmt: skip
    ctx.metrics.close()
    rows = read_metrics(ctx.out / "metrics.jsonl")
    plot_losses(rows, ctx.out / "loss.png", title=f"finetune ({cfg.task}, {cfg.method})")


def _augmenter(cfg: FinetuneConfig) -> Augmenter | None:
    if not cfg.augment.enabled:
        return None
    if cfg.task not in ("classify", "multitask"):  # EDA rewrites a record's "text" field
        raise ConfigError(
            "augment needs text+label records (--task classify or multitask), "
            f"not --task {cfg.task}; unset augment.enabled"
        )
    return Augmenter(cfg.augment)
