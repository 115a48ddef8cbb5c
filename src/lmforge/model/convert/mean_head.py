"""A mean-pooled encoder classifier's head, kept beside its encoder in a file of its own.

No transformers class averages the tokens' states before its classifier (BERT/RoBERTa
*ForSequenceClassification pool the first token), so finetune's pooling "mean" writes final/ as
the encoder transformers loads (BertForMaskedLM/BertModel) plus MEAN_HEAD: the Linear's weight
(n_labels, n_embd) and bias, its labels and pooling in the file's metadata. config.json names
the file (MEAN_HEAD_KEY), so a directory that lost its head says so instead of loading as a bare
encoder. Sentence-transformers style: mean of last_hidden_state over the attention mask, then
the Linear (tests/unit/finetune/test_encoder_mean_pooling.py reproduces our logits that way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.errors import InputError

if TYPE_CHECKING:
    from lmforge.model.convert.classifier import ClassifierHead

MEAN_HEAD = "mean_pooled_classifier.safetensors"
MEAN_HEAD_KEY = "lmforge_mean_pooled_head"  # config.json key whose value is MEAN_HEAD
RERUN = "rerun the finetune stage that trained it (--task classify --set pooling=mean)"


def save_mean_head(head: ClassifierHead, model_dir: Path) -> None:
    """Writes head (pooling "mean": weight and bias, no pooler) as model_dir/MEAN_HEAD, atomically;
    save_pretrained calls it for a mean-pooled classifier."""
    from safetensors.torch import save_file

    from lmforge.common.io import atomic_path

    tensors = {"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}
    meta = {"labels": json.dumps(head.labels), "pooling": "mean"}
    with atomic_path(Path(model_dir) / MEAN_HEAD) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_mean_head(model_dir: Path, hf: dict[str, Any]) -> ClassifierHead | None:
    """model_dir's mean-pooled head; None when it has none (and config.json names none)."""
    from safetensors import safe_open

    from lmforge.model.convert.classifier import ClassifierHead

    path = model_dir / MEAN_HEAD
    if not path.is_file():
        if hf.get(MEAN_HEAD_KEY):
            raise InputError(
                f"{model_dir}: config.json says its classifier head is {MEAN_HEAD}, which is "
                f"missing; {RERUN}"
            )
        return None
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata() or {}, set(f.keys())
        if not {"weight", "bias"} <= keys or "labels" not in meta:
            raise InputError(
                f"{path}: a mean-pooled head holds 'weight', 'bias' and labels in its metadata; "
                f"found tensors {sorted(keys)} (a whole model saved by an older lmforge?); {RERUN}"
            )
        weight, bias = f.get_tensor("weight").float(), f.get_tensor("bias").float()
    labels = [str(x) for x in json.loads(meta["labels"])]
    if weight.shape[0] != len(labels) or bias.shape != (len(labels),):
        raise InputError(
            f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not fit its "
            f"{len(labels)} labels; {RERUN}"
        )
    width = hf.get("hidden_size")
    if width is not None and weight.shape[1] != width:
        raise InputError(
            f"{path}: its weight reads {weight.shape[1]}-wide states, the encoder beside it "
            f"(config.json hidden_size) makes {width}; the head belongs to another model: {RERUN}"
        )
    return ClassifierHead(weight, labels, bias, pooling="mean")
