"""`compress prune` of a sequence classifier: its accuracy before pruning, pruned, and recovered.

A classifier's recovery trains what it is scored on: the cross-entropy of its head over labelled
examples (finetune's classification files: text, label, optional text_pair), through the one
training loop, with the head back on the pruned body (finetune.heads.SequenceClassifier, pooled
as it was trained: a decoder's last token, an encoder's pooler or mean) and trained with it;
magnitude pruning's zeros stay zero (prune.keep_zeros). Rows are cut where the source's
fine-tune cut them (its recorded seq_len), else at train.seq_len, which final/ then records, so
eval reads texts as the recovery trained on them. Accuracy and loss are measured on
`val_examples` (default: `examples`) for the original, the pruned and the recovered model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import InputError
from lmforge.model.transformer import Transformer

HINT = "give finetune's classification files (JSONL: text, label, optional text_pair)"


def labelled_rows(
    path: Path, labels: list[str], tok: Any, seq_len: int, encoder: bool
) -> dict[str, np.ndarray]:
    """path's examples as finetune encodes them (finetune.heads.encode_texts), class i being
    labels[i] (the head's order)."""
    from lmforge.finetune.formats import is_classification, load_examples
    from lmforge.finetune.heads import encode_texts

    _, examples = load_examples(path)
    if not is_classification(examples):
        raise InputError(f"{path}: a classifier's recovery trains on labelled examples; {HINT}")
    unknown = sorted({e["label"] for e in examples} - set(labels))
    if unknown:
        raise InputError(f"{path}: labels {unknown} are not the classifier's {labels}; "
                         "give examples of its own classes")  # fmt: skip
    texts, pairs = [e["text"] for e in examples], [e.get("text_pair") for e in examples]
    ys = [labels.index(e["label"]) for e in examples]
    return encode_texts(tok, texts, ys, seq_len, pairs=pairs, template=encoder)[0]


@torch.no_grad()
def class_scores(model: nn.Module, rows: dict[str, np.ndarray], batch_size: int) -> dict:
    """{"val_loss": mean cross-entropy, "accuracy"} of a SequenceClassifier over every row (the
    loop's eval_fn; it switches to eval mode around it)."""
    from lmforge.finetune.heads import classify_loss

    device = next(model.parameters()).device
    n = len(rows["class_labels"])
    loss = hits = 0.0
    for lo in range(0, n, batch_size):
        batch = {k: torch.from_numpy(v[lo : lo + batch_size]).to(device) for k, v in rows.items()}
        part, stats = classify_loss(model, batch)
        size = len(batch["class_labels"])
        loss, hits = loss + float(part) * size, hits + float(stats["acc"]) * size
    return {"val_loss": loss / n, "accuracy": hits / n}


def recover_classifier(
    pruned: Transformer, masks: dict[str, torch.Tensor], src: Path, original: Any, cfg: Any,
    ctx: Any,
) -> tuple[Any, dict[str, Any], dict[str, int]]:  # fmt: skip
    """(the trained head as model.convert.ClassifierHead, the report's accuracies and recovery,
    the config.json keys final/ adds: the seq_len rows were cut at when src records none)."""
    from lmforge.compress.prune import keep_zeros
    from lmforge.evals.heads import input_len
    from lmforge.finetune.heads import SEQ_LEN_KEY, SequenceClassifier, classify_loss
    from lmforge.model.convert import load_classifier, read_config
    from lmforge.train.loader import RowBatches
    from lmforge.train.loop import train

    head, tc = load_classifier(src), cfg.train
    recorded = read_config(src).get(SEQ_LEN_KEY) is not None
    seq_len = input_len(original) if recorded else min(tc.seq_len, pruned.config.block_size)
    encoder, val_path = not pruned.config.causal, cfg.val_examples or cfg.examples
    train_rows = labelled_rows(cfg.examples, head.labels, original.files, seq_len, encoder)
    val_rows = labelled_rows(val_path, head.labels, original.files, seq_len, encoder)
    bs = tc.micro_batch_size
    before = class_scores(SequenceClassifier.from_head(original.model, head).eval(), val_rows, bs)
    model = SequenceClassifier.from_head(pruned, head).eval()
    unrecovered = class_scores(model, val_rows, bs)
    keep_zeros(pruned, masks)
    loader = RowBatches(train_rows, bs, seed=tc.seed)
    result = train(model.train(), classify_loss, loader, tc, ctx, resume=False,
                   eval_fn=lambda m: class_scores(m, val_rows, bs))  # fmt: skip
    after = class_scores(model.eval(), val_rows, bs)
    report = {
        "accuracy_original": before["accuracy"],
        "accuracy_pruned": unrecovered["accuracy"],
        "accuracy_recovered": after["accuracy"],
        "classification": {
            "examples": str(cfg.examples), "val_examples": str(val_path),
            "val_rows": len(val_rows["class_labels"]), "seq_len": seq_len,
            "val_loss_original": before["val_loss"], "val_loss_pruned": unrecovered["val_loss"],
            "val_loss_recovered": after["val_loss"],
        },
        "recovery": {"steps": result.step, "train_loss": result.train_loss,
                     "val_loss": result.val_loss},
    }  # fmt: skip
    return model.classifier_head(head.labels), report, {} if recorded else {SEQ_LEN_KEY: seq_len}
