"""The model each finetune task trains and its training through the one loop.

build_model loads the base and applies what the config asks for (LoRA adapters or freezing, a
sequence or token head, a seq2seq model from a directory or from scratch); loss_for picks the
task's loss_fn; fit hands model, rows and parameter groups to lmforge.train.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.finetune import heads, seq2seq, tagging
from lmforge.finetune.config import FinetuneConfig
from lmforge.finetune.freeze import apply_freeze, param_groups
from lmforge.finetune.lora import inject
from lmforge.finetune.prepare import Prepared
from lmforge.finetune.sft import load_chat_tokenizer
from lmforge.model.t5 import wraps_transformers
from lmforge.train.loader import RowBatches
from lmforge.train.loop import train
from lmforge.train.pretrain import lm_loss

log = logging.getLogger(__name__)


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


def _start_from_base_head(model: nn.Module, model_dir: Path, labels: list[str]) -> None:
    """Copies the base model's classifier rows into the new head when it has exactly our labels
    and reads the same pooled state (a mean-pooled head never starts a first-token one)."""
    from lmforge.model.convert import load_classifier

    base = load_classifier(model_dir)
    if base is None or base.per_token != isinstance(model, tagging.TokenTagger):
        return
    if base.pooling != getattr(model, "pooling", base.pooling):
        log.info("%s pools %s, not %s: the head starts fresh", model_dir, base.pooling,
                 model.pooling)  # fmt: skip
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


def eval_fn(cfg: FinetuneConfig, rows: dict[str, np.ndarray]):
    """The loop's eval_fn: the task's loss averaged over the first train.eval_steps
    micro-batches of rows (always the same ones), as {"val_loss": ...}."""
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
        eval_fn=eval_fn(cfg, data.val_rows), param_groups=lr_groups,
    )  # fmt: skip
    return result.model, lm, result
