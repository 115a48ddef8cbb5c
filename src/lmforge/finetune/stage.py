"""The `finetune` stage: SFT, classification or both, full or LoRA, through the one training loop.

Inputs: a model directory in Hugging Face layout with its tokenizer files (our pretrain's final/
or an imported checkpoint) and a data file or directory (formats.py). The methods differ only in
what they hand the loop: rows (packed chat with assistant-only labels, or padded labeled texts),
the trainable parameters (LoRA adapters, or the model minus frozen parts, in layer-wise LR
groups) and the loss_fn. Outputs: final/ (the merged model, its generation_config.json (the
stop tokens of the chat template it was tuned on) and tokenizer files; for classify and
multitask the model is a Hugging Face *ForSequenceClassification with id2label and the pad id
its inputs are pooled by, see lmforge.model.convert), adapter/ (PEFT format, LoRA only),
metrics.jsonl, loss.png, checkpoints/ (a killed run resumes), and headline metrics in the manifest.

A classifier's final/ has no LM head when the model's embeddings are untied (transformers'
classifiers carry none), so multitask's trained lm_head survives only in tied models. A base model
that is itself a classifier with the same label set starts the head from its own.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from lmforge.artifacts import StageContext, require_artifact, run_stage
from lmforge.common.logging import MetricsWriter, read_metrics
from lmforge.config import NOT_HASHED, Section, StageConfig
from lmforge.data.augment import (
    AugmentConfig,
    Augmenter,
    attach_augmented,
    refuse_augmented,
    separate_augmented,
)
from lmforge.errors import ConfigError, InputError
from lmforge.evals.metrics import tag_metrics
from lmforge.finetune import heads, seq2seq, tagging
from lmforge.finetune.evaluate import rouge_eval
from lmforge.finetune.export import export_model, tuned_generation_config
from lmforge.finetune.formats import is_classification, is_seq2seq, is_tagging, load_examples
from lmforge.finetune.freeze import FreezeConfig, apply_freeze, param_groups
from lmforge.finetune.kfold import KFoldConfig, assign_folds, summarize
from lmforge.finetune.lora import LoraConfig, inject, lora_modules, merge, trainable_fraction
from lmforge.finetune.sft import build_sft_rows, load_chat_tokenizer
from lmforge.model.t5 import wraps_transformers
from lmforge.tokenizer.files import TokenizerFiles
from lmforge.tokenizer.generation import eos_ids
from lmforge.train.checkpoint import forget_other_runs
from lmforge.train.config import TrainConfig
from lmforge.train.loader import RowBatches
from lmforge.train.loop import train
from lmforge.train.observe import plot_losses
from lmforge.train.pretrain import lm_loss

log = logging.getLogger(__name__)
MODEL_HINT = "lmforge pretrain --tokens DIR --tokenizer DIR --out DIR (its final/ directory)"


class SFTOptions(Section):
    """How chat examples become training rows (the `sft:` section)."""

    truncation: Literal["left", "right", "drop"] = Field(
        "right", description="examples longer than train.seq_len: keep start|keep end|drop"
    )
    packing: bool = Field(True, description="pack short examples into one row (no cross-attention)")


class EvalOptions(Section):
    """Held-out evaluation after training (the `eval:` section)."""

    val_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of data held out for validation when no val_data"
    )
    rouge_examples: int = Field(
        32, ge=0, description="SFT: val examples answered greedily for ROUGE-L (0 = skip)"
    )
    max_new_tokens: int = Field(48, ge=1, description="SFT: answer length limit for ROUGE-L")
    compare_base: bool = Field(True, description="SFT: also score the base model's ROUGE-L")
    batch_size: int = Field(
        16,
        ge=1,
        description="SFT: prompts decoded together (greedy answers do not change)",
        json_schema_extra=NOT_HASHED,
    )


class MultitaskWeights(Section):
    """Loss weights of task=multitask: w_lm * LM loss + w_cls * classification loss."""

    w_lm: float = Field(1.0, ge=0, description="weight of next-token loss on the texts")
    w_cls: float = Field(1.0, ge=0, description="weight of the classification loss")


class FinetuneConfig(StageConfig):
    """`lmforge finetune --model DIR --data FILE --out DIR [--method full|lora] [--task ...]`."""

    model: Path = Field(
        description="model directory in HF layout with tokenizer files (or a pretrain stage dir)"
    )
    data: Path = Field(description="training data: .jsonl/.parquet file, dir, or saved HF dataset")
    val_data: Path | None = Field(None, description="validation data (default: split from data)")
    method: Literal["full", "lora"] = Field("full", description="full | lora")
    task: Literal["sft", "classify", "multitask", "tag", "seq2seq"] = Field(
        "sft",
        description="sft (chat) | classify (text+label) | multitask (LM + classify) | "
        "tag (tokens+tags, encoders) | seq2seq (source+target, encoder-decoders)",
    )
    from_scratch: str | None = Field(
        None,
        description="seq2seq: train this preset (e.g. bart-micro) from scratch; --model then "
        "only supplies the tokenizer files",
    )
    pooling: Literal["first", "mean"] = Field(
        "first",
        description="classify on an encoder: first ([CLS] through the pooler, exported as "
        "*ForSequenceClassification) | mean (average of the tokens' states; no transformers "
        "class computes it, so final/ is not written: the trained weights go to "
        "mean_pooled_classifier.safetensors)",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters")
    freeze: FreezeConfig = Field(default_factory=FreezeConfig, description="freezing / layer LRs")
    sft: SFTOptions = Field(default_factory=SFTOptions, description="SFT row building")
    multitask: MultitaskWeights = Field(default_factory=MultitaskWeights, description="weights")
    kfold: KFoldConfig = Field(default_factory=KFoldConfig, description="cross-validation")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig,
        description="classify/multitask: augmented copies of the training part (of each fold)",
    )
    eval: EvalOptions = Field(default_factory=EvalOptions, description="held-out evaluation")
    train: TrainConfig = Field(default_factory=TrainConfig, description="training loop settings")

    def inputs(self) -> list[Path]:
        paths = [p for p in (self.model, self.data, self.val_data) if p is not None]
        return paths + self.augment.inputs()

    def model_dir(self) -> Path:
        """`model`, or its final/ when `model` is a training stage's directory."""
        from lmforge.model.convert import resolve_model_dir

        return resolve_model_dir(self.model)


def finetune(cfg: FinetuneConfig, force: bool = False) -> Path:
    """Runs (or reuses) the finetune stage; returns its directory (final/ holds the model)."""
    return run_stage("finetune", cfg, build, force=force).out


# --------------------------------------------------------------------------- data


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
        ids = _seq2seq_ids(cfg, tok)
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


# --------------------------------------------------------------------------- model


def is_encoder(model_dir: Path) -> bool:
    """True when model_dir holds a bidirectional encoder (BERT/RoBERTa-style)."""
    from lmforge.model.convert import hf_config_to_model_config, read_config

    return not hf_config_to_model_config(read_config(model_dir)).causal


def build_model(cfg: FinetuneConfig, labels: list[str]) -> tuple[nn.Module, nn.Module]:
    """(trainable model, its language model): base loaded, adapters/freezing/head applied."""
    from lmforge.model.convert import load_pretrained

    if cfg.task == "seq2seq" or cfg.from_scratch:
        return _build_seq2seq(cfg)
    lm = load_pretrained(cfg.model_dir(), quantized="dequantize").train()
    if cfg.train.seq_len > lm.config.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size="
            f"{lm.config.block_size}; lower train.seq_len"
        )
    torch.manual_seed(cfg.train.seed)  # adapters and heads start the same on resume
    if cfg.method == "lora":
        inject(lm, cfg.lora)
    model: nn.Module = lm
    if not lm.config.causal and cfg.task not in ("classify", "tag"):
        raise ConfigError(
            f"{cfg.model_dir()} is an encoder (BERT-style): --task {cfg.task} needs a causal "
            "LM; use --task classify or tag"
        )
    if lm.config.causal and cfg.task == "tag":
        raise ConfigError(
            f"{cfg.model_dir()} is a causal LM: --task tag needs an encoder (a bert-* preset "
            "pretrained with --objective mlm, or a BERT/RoBERTa checkpoint)"
        )
    if cfg.task == "tag":
        model = tagging.TokenTagger(lm, len(labels))
    elif cfg.task != "sft":
        if cfg.pooling == "mean" and (lm.config.causal or cfg.task != "classify"):
            raise ConfigError("pooling: mean is for --task classify on an encoder")
        model = heads.SequenceClassifier(lm, len(labels), pooling=cfg.pooling)
        if cfg.pooling == "first":
            _start_from_base_head(model, cfg.model_dir(), labels)
    if cfg.method == "full":
        apply_freeze(model, cfg.freeze, lm.config.n_layer)
    return model, lm


def _build_seq2seq(cfg: FinetuneConfig) -> tuple[nn.Module, nn.Module]:
    if cfg.task != "seq2seq":
        raise ConfigError(f"from_scratch applies to --task seq2seq only, not --task {cfg.task}")
    if cfg.freeze.first_n_layers or cfg.freeze.layer_lr_decay != 1.0:
        raise ConfigError(
            "freeze.first_n_layers and freeze.layer_lr_decay count a decoder's blocks; for "
            "seq2seq freeze by name with freeze.patterns (e.g. 'enc_blocks.0.*')"
        )
    torch.manual_seed(cfg.train.seed)  # a scratch model and adapters start the same on resume
    vocab = load_chat_tokenizer(cfg.model_dir()).vocab_size
    model = seq2seq.build_seq2seq_model(cfg.model_dir(), cfg.from_scratch, vocab)
    if cfg.train.seq_len > model.config.block_size:
        raise ConfigError(
            f"train.seq_len={cfg.train.seq_len} exceeds the model's block_size="
            f"{model.config.block_size} (longest source or target); lower train.seq_len"
        )
    if cfg.method == "lora":
        inject(model, seq2seq.lora_targets_for(model, cfg.lora))
    elif not wraps_transformers(model):  # freezing names our blocks; the T5 adapter trains whole
        apply_freeze(model, cfg.freeze, model.config.n_layer)
    return model, model


def _seq2seq_ids(cfg: FinetuneConfig, tok: TokenizerFiles) -> seq2seq.Seq2SeqIds:
    """The base model's special ids (none from scratch: the tokenizer's)."""
    config_json = cfg.model_dir() / "config.json"
    base = {} if cfg.from_scratch else json.loads(config_json.read_text(encoding="utf-8"))
    return seq2seq.Seq2SeqIds.of(base, tok)


def _start_from_base_head(model: nn.Module, model_dir: Path, labels: list[str]) -> None:
    """Copies the base model's classifier rows into the new head when it has exactly our labels."""
    from lmforge.model.convert import load_classifier

    base = load_classifier(model_dir)
    if base is None or base.per_token != isinstance(model, tagging.TokenTagger):
        return
    if sorted(base.labels) != labels:
        log.info("%s classifies %s, not %s: the head starts fresh", model_dir, base.labels, labels)
        return
    order = [base.labels.index(name) for name in labels]
    with torch.no_grad():
        model.head.weight.copy_(base.weight[order])
        if model.head.bias is not None and base.bias is not None:
            model.head.bias.copy_(base.bias[order])
        if model.pool is not None and base.pool_weight is not None:
            model.pool.weight.copy_(base.pool_weight)
            model.pool.bias.copy_(base.pool_bias)


def loss_for(cfg: FinetuneConfig):
    """The loss_fn handed to the loop."""
    if cfg.task == "sft":
        return lm_loss
    if cfg.task == "seq2seq":
        return seq2seq.seq2seq_loss
    if cfg.task == "classify":
        return heads.classify_loss
    if cfg.task == "tag":
        return tagging.tag_loss
    return heads.make_multitask_loss(cfg.multitask.w_lm, cfg.multitask.w_cls)


def _eval_fn(cfg: FinetuneConfig, rows: dict[str, np.ndarray]):
    loss_fn = loss_for(cfg)
    bs = cfg.train.micro_batch_size
    n_batches = max(1, min(cfg.train.eval_steps, -(-len(rows["input_ids"]) // bs)))

    def evaluate(model: nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        losses = []
        for b in range(n_batches):
            batch = {
                k: torch.from_numpy(v[b * bs : (b + 1) * bs]).to(device) for k, v in rows.items()
            }
            losses.append(float(loss_fn(model, batch)[0]))
        return {"val_loss": float(np.mean(losses))}

    return evaluate


def fit(cfg: FinetuneConfig, ctx: Any, data: Prepared) -> tuple[nn.Module, nn.Module, Any]:
    """Builds the model and trains it with the one loop; returns (model, lm, TrainResult)."""
    model, lm = build_model(cfg, data.labels)
    tc = cfg.train
    lr_groups = param_groups(model, cfg.freeze, tc.lr, tc.weight_decay, lm.config.n_layer)
    if not lr_groups:
        raise ConfigError("nothing left to train: every parameter is frozen; relax freeze.*")
    loader = RowBatches(data.train_rows, tc.micro_batch_size, seed=tc.seed)
    result = train(
        model, loss_for(cfg), loader, tc, ctx,
        eval_fn=_eval_fn(cfg, data.val_rows), param_groups=lr_groups,
    )  # fmt: skip
    return result.model, lm, result


# --------------------------------------------------------------------------- stage


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
        train_loss=_round(result.train_loss), val_loss=_round(result.val_loss), steps=result.step,
        trainable_params=trainable, total_params=total,
        trainable_fraction=round(trainable / total, 5), resumed_from_step=result.resumed_from,
        **{f"data_{k}": v for k, v in data.stats.items() if k in ("examples", "rows", "truncated", "dropped")},
    )  # fmt: skip
    if cfg.task == "sft":
        headline.update(_sft_eval(cfg, tok, model, data))
    elif cfg.task == "seq2seq":
        headline.update(_seq2seq_eval(cfg, ctx, tok, model, data))
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
        from lmforge.model.convert import MEAN_POOLING_REFUSAL

        headline["export"] = f"refused: {MEAN_POOLING_REFUSAL}"
    return headline


def task_labels(cfg: FinetuneConfig, examples: list) -> list[str]:
    """The sorted class names (classify, multitask) or tag names (tag); none for sft."""
    if cfg.task == "tag":
        return sorted({t for e in examples for t in e["tags"]})
    return sorted({e["label"] for e in examples}) if cfg.task not in ("sft", "seq2seq") else []


def _sft_eval(cfg: FinetuneConfig, tok: TokenizerFiles, model: nn.Module, data: Prepared) -> dict:
    """ROUGE-L of greedy answers on val examples; with compare_base, the base model's too.

    base_val_loss is the untuned model on the same val batches as val_loss, so the gain of any
    method is base_val_loss - val_loss.
    """
    from lmforge.model.convert import load_pretrained

    out: dict[str, Any] = {}
    base = None
    if cfg.eval.compare_base:
        base = load_pretrained(
            cfg.model_dir(), next(model.parameters()).device, quantized="dequantize"
        )
        with torch.no_grad():
            out["base_val_loss"] = _round(_eval_fn(cfg, data.val_rows)(base)["val_loss"])
    examples = data.val_examples[: cfg.eval.rouge_examples]
    if examples:
        stops = eos_ids(
            tuned_generation_config(cfg.model_dir(), tok)
        )  # what final/ will stop at, base included
        opts = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
        score, _ = rouge_eval(model, tok, examples, stops, **opts)
        out.update(rouge_l=round(score, 4), rouge_examples=len(examples))
        if base is not None:
            base_score, _ = rouge_eval(base, tok, examples, stops, **opts)
            out["base_rouge_l"] = round(base_score, 4)
    return out


def _seq2seq_eval(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, model: nn.Module, data: Prepared
) -> dict[str, Any]:
    """Text metrics of greedy outputs on val (base_* and base_val_loss too for a pretrained
    base), and val_outputs.jsonl with each source, target and output."""
    from lmforge.model.convert import load_pretrained

    examples = data.val_examples[: cfg.eval.rouge_examples]
    if not examples:
        return {}
    ids = _seq2seq_ids(cfg, tok)
    opts = dict(max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    scores, rows = seq2seq.seq2seq_eval(model, tok, examples, ids, **opts)
    ctx.atomic_write_text(
        ctx.out / "val_outputs.jsonl", "".join(json.dumps(r) + "\n" for r in rows)
    )
    out: dict[str, Any] = {**scores, "eval_examples": len(examples)}
    if cfg.eval.compare_base and not cfg.from_scratch:
        base = load_pretrained(
            cfg.model_dir(), next(model.parameters()).device, quantized="dequantize"
        )
        with torch.no_grad():
            out["base_val_loss"] = _round(_eval_fn(cfg, data.val_rows)(base)["val_loss"])
        base_scores, _ = seq2seq.seq2seq_eval(base, tok, examples, ids, **opts)
        out.update({f"base_{k}": v for k, v in base_scores.items()})
    return out


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
        seq2seq_ids = _seq2seq_ids(cfg, tok).config(tok.bos_id)
    elif cfg.task != "sft":
        classifier = model.classifier_head(labels)
    if classifier is not None and classifier.pooling == "mean":
        _save_unexportable(ctx, model, labels)
    else:  # a classifier pools by the pad id encode_texts padded with
        export_model(ctx, cfg.model_dir(), lm, tok, classifier=classifier, seq2seq_ids=seq2seq_ids)
    ctx.metrics.close()
    rows = read_metrics(ctx.out / "metrics.jsonl")
    plot_losses(rows, ctx.out / "loss.png", title=f"finetune ({cfg.task}, {cfg.method})")


def _save_unexportable(ctx: StageContext, model: nn.Module, labels: list[str]) -> None:
    """A mean-pooled classifier: no transformers class computes it (convert.MEAN_POOLING_REFUSAL),
    so no final/; its weights (SequenceClassifier's state dict, LoRA merged) and labels are kept
    so the training is not lost (no lmforge loader reads this file yet)."""
    from safetensors.torch import save_model

    if lora_modules(model):
        merge(model)
    with ctx.atomic_path(ctx.out / "mean_pooled_classifier.safetensors") as tmp:
        # save_model keeps one name of tied tensors (the MLM head shares the embedding)
        save_model(model, str(tmp), metadata={"labels": json.dumps(labels), "pooling": "mean"})


def _augmenter(cfg: FinetuneConfig) -> Augmenter | None:
    if not cfg.augment.enabled:
        return None
    if cfg.task not in ("classify", "multitask"):  # EDA rewrites a record's "text" field
        raise ConfigError(
            "augment needs text+label records (--task classify or multitask), "
            f"not --task {cfg.task}; unset augment.enabled"
        )
    return Augmenter(cfg.augment)


def _fit_fold(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, name: str,
    train_ex: list, held: list, labels: list[str],
) -> dict[str, Any]:  # fmt: skip
    """Trains on train_ex in folds/<name>/ and returns the held-out metrics."""
    fold_dir = ctx.out / "folds" / name
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_ctx = StageContext(
        out=fold_dir, stage=f"{ctx.stage}/{name}", log=ctx.log,
        metrics=MetricsWriter(fold_dir / "metrics.jsonl"),
    )  # fmt: skip
    data = prepare(cfg, tok, train_ex, held, labels)
    fold_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"ckpt_every": 0})})
    model, _, result = fit(fold_cfg, fold_ctx, data)
    fold_ctx.metrics.close()
    preds = heads.predict(model, data.val_rows)
    metrics = heads.classification_metrics(data.val_rows["class_labels"], preds, len(labels))
    return {"val_loss": result.val_loss, "train_examples": len(train_ex), **metrics}


def cross_validate(
    cfg: FinetuneConfig, ctx: StageContext, tok: TokenizerFiles, examples: list,
    labels: list[str], augmenter: Augmenter | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Trains one model per held-out fold (in folds/fold_i/); mean and std of val metrics.

    Only original rows are folded; already-augmented rows follow their source into training.
    With an augmenter each fold augments its own training part (never the held-out fold), and
    with augment.compare the same fold is also trained without augmentation (folds/fold_i_noaug/)
    so folds/augment_compare.json holds both, mean and std over the same folds.
    """
    originals, augmented = separate_augmented(examples)
    folds = assign_folds(originals, cfg.kfold.k, cfg.kfold.seed)
    per_fold, plain = [], []
    for f in range(cfg.kfold.k):
        held = [e for e, g in zip(originals, folds, strict=True) if g == f]
        rest = attach_augmented(
            [e for e, g in zip(originals, folds, strict=True) if g != f], augmented
        )
        train_ex = rest + augmenter.augment(rest, "train") if augmenter else rest
        per_fold.append(_fit_fold(cfg, ctx, tok, f"fold_{f}", train_ex, held, labels))
        ctx.metrics.log(fold=f, **per_fold[-1])
        if augmenter is not None and cfg.augment.compare:
            plain.append(_fit_fold(cfg, ctx, tok, f"fold_{f}_noaug", rest, held, labels))
    ctx.atomic_write_json(ctx.out / "folds" / "folds.json", per_fold)
    out: dict[str, Any] = summarize(per_fold)
    if plain:
        without = summarize(plain)
        compare = {
            "k": cfg.kfold.k, "methods": cfg.augment.methods, "alpha": cfg.augment.alpha,
            "copies": cfg.augment.copies, "synonyms": augmenter.synonym_source,  # type: ignore[union-attr]
            "with": out, "without": without, "per_fold": {"with": per_fold, "without": plain},
        }  # fmt: skip
        ctx.atomic_write_json(ctx.out / "folds" / "augment_compare.json", compare)
        out = {**out, **{f"noaug_{k}": v for k, v in without.items() if k != "cv_folds"}}
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(float(x), 5)
